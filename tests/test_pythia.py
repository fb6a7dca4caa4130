"""configs/pythia: the published Pythia shapes, parameter counts and hyperparameters."""

from pathlib import Path

import pytest
import torch

from neoxlab.cli import main
from neoxlab.config import load_config, model_config, padded_vocab_size
from neoxlab.model import GPTNeoX
from neoxlab.optim import build_optimizer

PYTHIA = Path(__file__).resolve().parents[1] / "configs" / "pythia"
GPT_NEOX_20B_TOKENS = 50277

# Parameter counts of EleutherAI's released Pythia models (Hugging Face GPTNeoXForCausalLM).
PUBLISHED = {
    "14M": (14_067_712, 6, 128, 4, 1.0e-3),
    "31M": (30_494_720, 6, 256, 8, 1.0e-3),
    "70M": (70_426_624, 6, 512, 8, 1.0e-3),
    "160M": (162_322_944, 12, 768, 12, 6.0e-4),
    "410M": (405_334_016, 24, 1024, 16, 3.0e-4),
    "1B": (1_011_781_632, 16, 2048, 8, 3.0e-4),
    "1.4B": (1_414_647_808, 24, 2048, 16, 2.0e-4),
    "2.8B": (2_775_208_960, 32, 2560, 32, 1.6e-4),
    "6.9B": (6_857_302_016, 32, 4096, 32, 1.2e-4),
    "12B": (11_846_072_320, 36, 5120, 40, 1.2e-4),
}
PADDED_VOCAB = {"6.9B": 50432, "12B": 50688}  # tensor-parallel 2 and 4 in gpt-neox


def test_every_size_has_a_config():
    assert sorted(p.stem for p in PYTHIA.glob("*.yml")) == sorted(PUBLISHED)


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_shape_and_parameter_count(name):
    count, layers, hidden, heads, lr = PUBLISHED[name]
    config = load_config([PYTHIA / f"{name}.yml"])
    assert (config.num_layers, config.hidden_size, config.num_attention_heads) == (
        layers,
        hidden,
        heads,
    )
    vocab = padded_vocab_size(GPT_NEOX_20B_TOKENS, config.make_vocab_size_divisible_by)
    assert vocab == PADDED_VOCAB.get(name, 50304)
    with torch.device("meta"):
        model = GPTNeoX(model_config(config, vocab))
    assert model.num_parameters() == count
    assert model.embed_out.bias is None  # untied head without bias
    assert model.embed_out.weight is not model.gpt_neox.embed_in.weight
    # Pythia's training recipe
    assert config.seq_length == config.context_length == 2048
    assert config.batch_geometry(1)[2] == 1024 and config.batch_geometry(8)[2] == 1024
    assert config.train_iters == config.lr_decay_iters == 143_000
    assert config.lr == pytest.approx(lr) and config.min_lr == pytest.approx(lr / 10)
    assert config.lr_decay_style == "cosine" and config.warmup == 0.01
    assert config.optimizer == {"type": "Adam", "params": {"betas": [0.9, 0.95], "eps": 1e-8}}
    assert config.weight_decay == 0.1 and config.gradient_clipping == 1.0
    assert config.rotary_pct == 0.25 and config.gpt_j_residual
    assert config.activation == "gelu_tanh" and config.layernorm_epsilon == 1e-5
    assert config.hidden_dropout == config.attention_dropout == 0
    assert config.split == "969,30,1"


def test_weight_decay_on_matrices_only():
    config = load_config([PYTHIA / "14M.yml"])
    model = GPTNeoX(model_config(config, 50304))
    decayed, plain = build_optimizer(model, config).param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.dim() == 2 for p in decayed["params"])
    assert all(p.dim() == 1 for p in plain["params"])


def test_dry_run_prints_the_count_without_data_or_gpu(capsys):
    assert main(["train", str(PYTHIA / "160M.yml"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "162,322,944" in out and "50,304" in out

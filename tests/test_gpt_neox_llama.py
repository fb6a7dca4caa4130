"""gpt-neox's Llama-family configs: they load with gpt-neox's meaning of each architecture key and
dry-run to the published parameter counts; what gpt-neox itself cannot run is refused, naming the
key; a small config with the same keys trains and exports as LlamaForCausalLM.

As in test_gpt_neox_config.py, each mapping has the keys and values of the gpt-neox file it stands
for (EleutherAI/gpt-neox at ea7aefd8), gpt-neox's comments left out.
"""

import json

import pytest
import torch
from test_gpt_neox_config import LLAMA_7B, ZERO_STAGE_1, load, write

from neoxlab.cli import main
from neoxlab.config import load_config, mlp_widths
from neoxlab.errors import NeoxlabError
from neoxlab.hf import load_trained
from neoxlab.tokenizer import train_bpe
from neoxlab.trainer import train

transformers = pytest.importorskip("transformers")

LLAMA2_7B = {  # configs/llama2/7B.yml
    "pipe_parallel_size": 1,
    "model_parallel_size": 1,
    "make_vocab_size_divisible_by": 1,
    "num_layers": 32,
    "hidden_size": 4096,
    "intermediate_size": 32768,
    "num_attention_heads": 32,
    "seq_length": 4096,
    "max_position_embeddings": 4096,
    "pos_emb": "rotary",
    "rotary_pct": 1,
    "no_weight_tying": True,
    "gpt_j_residual": False,
    "output_layer_parallelism": "column",
    "norm": "rmsnorm",
    "rms_norm_epsilon": 1.0e-5,
    "scaled_upper_triang_masked_softmax_fusion": True,
    "bias_gelu_fusion": False,
    "use_bias_in_norms": False,
    "use_bias_in_attn_linear": False,
    "activation": "swiglu",
    "mlp_multiple_of": 256,
}
MISTRAL_7B = {  # configs/mistral/7B.yml
    "pipe_parallel_size": 1,
    "model_parallel_size": 1,
    "make_vocab_size_divisible_by": 1,
    "num_layers": 32,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_kv_heads": 8,
    "seq_length": 8192,
    "sliding_window_width": 4096,
    "max_position_embeddings": 131072,
    "pos_emb": "rotary",
    "rotary_pct": 1,
    "rotary_emb_base": 10000,
    "no_weight_tying": True,
    "gpt_j_residual": False,
    "output_layer_parallelism": "column",
    "norm": "rmsnorm",
    "rms_norm_epsilon": 1.0e-5,
    "attention_config": [[["flash"], 32]],
    "scaled_upper_triang_masked_softmax_fusion": True,
    "bias_gelu_fusion": False,
    "use_bias_in_norms": False,
    "use_bias_in_attn_linear": False,
    "activation": "swiglu",
    "tokenizer_type": "SPMTokenizer",
}
LLAMA_TRAIN_CONFIG = {  # configs/llama/train_config.yml, the model configs' companion
    "finetune": True,
    "init_method": "small_init",
    "output_layer_init_method": "wang_init",
    "optimizer": {"type": "Adam", "params": {"lr": 0.0002, "betas": [0.9, 0.95], "eps": 1.0e-8}},
    "min_lr": 0.00002,
    "override_lr_scheduler": True,
    "zero_optimization": {k: v for k, v in ZERO_STAGE_1.items() if k != "cpu_offload"},
    "train_micro_batch_size_per_gpu": 4,
    "data_impl": "mmap",
    "checkpoint_activations": True,
    "checkpoint_num_layers": 1,
    "partition_activations": True,
    "synchronize_each_layer": True,
    "gradient_clipping": 1.0,
    "weight_decay": 0.1,
    "hidden_dropout": 0,
    "attention_dropout": 0,
    "fp16": {
        "fp16": True,
        "enabled": True,
        "loss_scale": 0,
        "loss_scale_window": 1000,
        "hysteresis": 2,
        "min_loss_scale": 1,
    },
    "train_iters": 320000,
    "lr_decay_iters": 320000,
    "distributed_backend": "nccl",
    "lr_decay_style": "cosine",
    "warmup": 0.01,
    "checkpoint_factor": 10000,
    "eval_interval": 1000,
    "eval_iters": 10,
    "log_interval": 100,
    "steps_per_print": 10,
    "keep_last_n_checkpoints": 4,
    "wall_clock_breakdown": True,
}
# from scratch (gpt-neox's llama README: set finetune false), Llama's 32,000-token vocabulary
FROM_SCRATCH = ["finetune=false", "tokenizer-type=bpe", "vocab-size=32000"]
LLAMA_2_7B_PARAMETERS = 6_738_415_616  # Meta's Llama-2-7B (and LLaMA-7B)
MISTRAL_7B_PARAMETERS = 7_241_732_096  # Mistral-7B-v0.1


def dry_run_parameters(tmp_path, capsys, model: dict, *overrides: str) -> tuple[int, str]:
    files = [write(tmp_path, model, "7B.yml"), write(tmp_path, LLAMA_TRAIN_CONFIG, "train.yml")]
    assert main(["train", *map(str, files), *overrides, "--dry-run"]) == 0
    out, err = capsys.readouterr()
    line = next(x for x in out.splitlines() if x.startswith("parameters: "))
    return int(line.split()[1].replace(",", "")), err


def test_llama_7b_dry_runs_to_the_published_count(tmp_path, capsys):
    count, _ = dry_run_parameters(tmp_path, capsys, LLAMA_7B, *FROM_SCRATCH)
    assert count == LLAMA_2_7B_PARAMETERS
    config, _ = load(tmp_path, {**LLAMA_7B, **LLAMA_TRAIN_CONFIG}, FROM_SCRATCH)
    assert mlp_widths(config) == (2 * 11008, 11008)  # ⅔ of 32768, to multiples of 2 x 256
    assert (config.norm, config.rms_norm_epsilon, config.rotary_pct) == ("rmsnorm", 1e-6, 1.0)


def test_llama2_7b_has_mlp_biases_in_gpt_neox_unless_told(tmp_path, capsys):
    """llama2/7B.yml predates use-bias-in-mlp (default true): gpt-neox builds its SwiGLU MLPs
    with biases, 835,584 parameters more than Meta's model; neoxlab does the same and says so."""
    count, err = dry_run_parameters(tmp_path, capsys, LLAMA2_7B, *FROM_SCRATCH)
    assert count == LLAMA_2_7B_PARAMETERS + 32 * (2 * 11008 + 4096)
    assert "SwiGLU MLPs that have biases" in err and "use-bias-in-mlp=false" in err
    count, err = dry_run_parameters(
        tmp_path, capsys, LLAMA2_7B, *FROM_SCRATCH, "use-bias-in-mlp=false"
    )
    assert count == LLAMA_2_7B_PARAMETERS and "MLPs that have biases" not in err


def test_mistral_7b_refusals_name_each_key_then_the_published_count(tmp_path, capsys):
    mistral = [*FROM_SCRATCH, "use-bias-in-mlp=false"]
    with pytest.raises(
        NeoxlabError, match=r"sliding-window-width 4096 .* shorter than the context"
    ):
        load(tmp_path, {**MISTRAL_7B, **LLAMA_TRAIN_CONFIG}, mistral)
    # with the context inside the window, gpt-neox's ⅔ rule gives layers it cannot run
    mistral += ["seq-length=4096", "max-position-embeddings=4096"]
    with pytest.raises(NeoxlabError, match=r"takes 4,778, .*write intermediate-size 43008"):
        load(tmp_path, {**MISTRAL_7B, **LLAMA_TRAIN_CONFIG}, mistral)
    mistral.append("intermediate-size=43008")
    count, _ = dry_run_parameters(tmp_path, capsys, MISTRAL_7B, *mistral)
    assert count == MISTRAL_7B_PARAMETERS


# A small config with llama2/7B.yml's keys (and use-bias-in-mlp false, as llama/ has it), grouped
# key/value heads as llama2/70B.yml, and a training file: CPU-sized.
LLAMA_TINY = {
    **LLAMA2_7B,
    "num_layers": 2,
    "hidden_size": 64,
    "intermediate_size": 512,  # ⌊⅔ x 512⌋ = 341, to a multiple of 2 x 32: 384, halves of 192
    "num_attention_heads": 4,
    "num_kv_heads": 2,
    "seq_length": 64,
    "max_position_embeddings": 64,
    "mlp_multiple_of": 32,
    "use_bias_in_mlp": False,
}
TINY_TRAINING = {
    "optimizer": {"type": "Adam", "params": {"lr": 0.003, "betas": [0.9, 0.95], "eps": 1.0e-8}},
    "train_micro_batch_size_per_gpu": 4,
    "train_iters": 6,
    "lr_decay_style": "cosine",
    "warmup": 0.01,
    "eval_interval": 6,
    "eval_iters": 2,
    "log_interval": 1,
    "tokenizer_type": "HFTokenizer",
    "data_impl": "mmap",
}


def test_a_small_llama_config_trains_and_exports_as_llama(tmp_path, tiny_corpus, capsys):
    vocab = tmp_path / "tokenizer.json"
    train_bpe([tiny_corpus.read_text(encoding="utf-8")[:50_000]], 300).save(str(vocab))
    files = [write(tmp_path, LLAMA_TINY, "tiny.yml"), write(tmp_path, TINY_TRAINING, "train.yml")]
    overrides = [f"data-path={tiny_corpus}", f"vocab-file={vocab}", "device=cpu"]
    config = load_config(files, [*overrides, "sample-tokens=0"], notice=lambda _: None)
    assert mlp_widths(config) == (384, 192) and config.num_kv_heads == 2
    result = train(config, progress=False, log=lambda _: None)
    assert result.finished and result.step == 6
    out = tmp_path / "export"
    assert main(["export", str(result.run_dir), "--out", str(out)]) == 0
    exported = json.loads((out / "config.json").read_text())
    assert (
        exported["architectures"] == ["LlamaForCausalLM"] and exported["intermediate_size"] == 192
    )
    ours = load_trained(result.run_dir, torch.device("cpu"))
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([ours.tokenizer.encode("ROMEO: but soft").ids])
    with torch.no_grad():
        torch.testing.assert_close(hf_model(ids).logits, ours.model(ids)[0], atol=1e-5, rtol=0)

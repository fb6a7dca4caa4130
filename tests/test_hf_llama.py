"""Llama-architecture models through neoxlab: a LlamaForCausalLM folder generates as transformers
does, is a starting point for training (init-from), and a Llama-shaped run exports back as
LlamaForCausalLM; a model neither transformers class computes is refused at export.

As in test_hf.py, the "Llama" is a tiny random LlamaForCausalLM with a BPE tokenizer trained on
the chat example file, saved the way a downloaded one is laid out.
"""

import json
from pathlib import Path

import pytest
import torch
from test_hf import (
    CHAT_CONFIG,
    CHAT_EXAMPLE,
    PROMPT,
    VOCAB_ROWS,
    cli_greedy_text,
    finetune_overrides,
    hf_greedy,
    neoxlab_greedy,
)

from neoxlab.cli import main
from neoxlab.config import load_config
from neoxlab.hf import load_trained, transformers_model
from neoxlab.tokenizer import save_tokenizer, train_bpe
from neoxlab.trainer import Trainer, train

transformers = pytest.importorskip("transformers")


def make_tiny_llama(folder: Path) -> Path:
    """Grouped-query (4 query heads, 2 key/value heads), tied embeddings, rope base 500."""
    config = transformers.LlamaConfig(
        vocab_size=VOCAB_ROWS,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=40,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        rope_theta=500.0,
        tie_word_embeddings=True,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=1,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():  # norms away from 1, so parity checks that they are used
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
    model.save_pretrained(folder)
    save_tokenizer(train_bpe([CHAT_EXAMPLE.read_text(encoding="utf-8")], 300), folder)
    return folder


@pytest.fixture
def llama(tmp_path) -> Path:
    (tmp_path / CHAT_EXAMPLE.name).write_bytes(CHAT_EXAMPLE.read_bytes())
    return make_tiny_llama(tmp_path / "tiny-llama")


def test_llama_folder_generates_as_transformers(llama, capsys):
    trained = load_trained(llama, torch.device("cpu"))
    config = trained.config
    assert (config.norm, config.activation, config.num_kv_heads) == ("rmsnorm", "swiglu", 2)
    assert not config.no_weight_tying and not config.use_bias_in_attn_linear
    assert trained.model.config.intermediate_size == 40  # gpt-neox's ⅔ of intermediate-size 120
    ids = torch.tensor([trained.tokenizer.encode(PROMPT).ids])
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(llama).eval()
    with torch.no_grad():
        torch.testing.assert_close(trained.model(ids)[0], hf_model(ids).logits, atol=1e-5, rtol=0)
    ours = neoxlab_greedy(llama, PROMPT, 16)
    assert ours == hf_greedy(llama, PROMPT, 16)[: len(ours)]
    text = cli_greedy_text(llama, PROMPT, 16, capsys)
    assert text == PROMPT + trained.tokenizer.decode(ours, skip_special_tokens=True) + "\n"


def test_a_llama_shaped_model_reaches_lm_eval_as_llama(llama):
    # what neoxlab eval --tasks hands lm-eval: the export's class, built in memory
    trained = load_trained(llama, torch.device("cpu"))
    model, _ = transformers_model(trained)
    assert type(model).__name__ == "LlamaForCausalLM"
    ids = torch.tensor([trained.tokenizer.encode(PROMPT).ids])
    with torch.no_grad():
        torch.testing.assert_close(trained.model(ids)[0], model(ids).logits, atol=1e-5, rtol=0)


def test_init_from_llama_finetunes_and_exports_as_llama(llama, tmp_path, capsys):
    overrides = finetune_overrides(llama, "train-iters=4", "eval-interval=4", "save-interval=4")
    trainer = Trainer(load_config([CHAT_CONFIG], overrides), progress=False, log=lambda _: None)
    hf_weights = transformers.AutoModelForCausalLM.from_pretrained(llama).state_dict()
    imported = trainer.model.state_dict()
    assert torch.equal(
        imported["gpt_neox.embed_in.weight"], hf_weights["model.embed_tokens.weight"]
    )
    run_dir = trainer.run().run_dir

    out = tmp_path / "export"
    assert main(["export", str(run_dir), "--out", str(out)]) == 0
    exported = json.loads((out / "config.json").read_text())
    assert exported["architectures"] == ["LlamaForCausalLM"]
    assert (exported["num_key_value_heads"], exported["intermediate_size"]) == (2, 40)
    assert exported["tie_word_embeddings"] and exported["hidden_act"] == "silu"
    assert "LlamaForCausalLM" in (out / "README.md").read_text()
    ours = neoxlab_greedy(run_dir, PROMPT, 16)
    assert ours == hf_greedy(out, PROMPT, 16)[: len(ours)]
    capsys.readouterr()
    assert cli_greedy_text(run_dir, PROMPT, 16, capsys) == cli_greedy_text(out, PROMPT, 16, capsys)
    # the export reads back as the run's weights
    run, again = (load_trained(p, torch.device("cpu")).model.state_dict() for p in (run_dir, out))
    assert all(torch.equal(again[name], tensor) for name, tensor in run.items())


def tiny_run(tiny_corpus, *extra: str):
    overrides = [f"data-path={tiny_corpus}", "hidden-size=32", "num-layers=2", "seq-length=32"]
    overrides += ["num-attention-heads=4", "vocab-size=300", "train-iters=2", "eval-iters=1"]
    overrides += ["sample-tokens=0", "device=cpu", *extra]
    return train(load_config([], overrides), progress=False, log=lambda _: None).run_dir


def test_pythia_with_tied_embeddings_and_no_attention_bias_exports_as_gpt_neox(
    tiny_corpus, tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    run_dir = tiny_run(tiny_corpus, "no-weight-tying=false", "use-bias-in-attn-linear=false")
    out = tmp_path / "export"
    assert main(["export", str(run_dir), "--out", str(out)]) == 0
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf_model).__name__ == "GPTNeoXForCausalLM"
    assert hf_model.config.tie_word_embeddings and not hf_model.config.attention_bias
    ours = load_trained(run_dir, torch.device("cpu"))
    ids = torch.tensor([ours.tokenizer.encode("ROMEO: what").ids])
    with torch.no_grad():
        torch.testing.assert_close(hf_model(ids).logits, ours.model(ids)[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["norm=rmsnorm"], "the closer, GPTNeoXForCausalLM, needs norm layernorm"),
        (
            ["norm=rmsnorm", "activation=swiglu", "gpt-j-residual=false", "rotary-pct=0.5"],
            "the closer, LlamaForCausalLM, needs rotary-pct 1.0, this model has rotary-pct 0.5",
        ),
        (["num-kv-heads=2"], "GPTNeoXForCausalLM, needs num-kv-heads 4"),
    ],
)
def test_export_refuses_a_mixture_naming_the_key(
    tiny_corpus, tmp_path, monkeypatch, capsys, extra, message
):
    monkeypatch.chdir(tmp_path)
    run_dir = tiny_run(tiny_corpus, *extra)
    capsys.readouterr()
    out = tmp_path / "export"
    assert main(["export", str(run_dir), "--out", str(out)]) == 2
    error = capsys.readouterr().err
    assert message in error and error.count("\n") <= 2, error  # the line and its hint
    assert not out.exists() and not list(tmp_path.glob("export.tmp-*"))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 500.0}}, "rope type 'llama3'"),
        ({"head_dim": 16}, "head_dim 16 (neoxlab's is hidden_size / heads)"),
        ({"hidden_act": "gelu"}, "hidden_act 'gelu' (SwiGLU's is silu)"),
    ],
)
def test_llama_features_neoxlab_lacks_are_named(llama, capsys, change, message):
    config = json.loads((llama / "config.json").read_text())
    (llama / "config.json").write_text(json.dumps({**config, **change}))
    assert main(["generate", str(llama), "--prompt", "User:", "--device", "cpu"]) == 2
    assert message in capsys.readouterr().err

"""The architecture variants of model.py: each changes the network as gpt-neox defines it, and
a Llama-shaped model computes what transformers' LlamaForCausalLM computes."""

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_model import VOCAB, generated, greedy_without_cache, random_tokens, tiny_model

from neoxlab.cli import main
from neoxlab.config import load_config, mlp_width, mlp_widths, model_config
from neoxlab.errors import NeoxlabError
from neoxlab.hf import export_class
from neoxlab.hf_llama import from_llama_weights, llama_config, to_llama_weights
from neoxlab.model import MLP, Attention, GPTNeoX, ModelConfig, SwiGLU, make_norm
from neoxlab.trainer import train

HIDDEN, LAYERS, HEADS, WIDTH = 32, 2, 4, 48  # test_model.tiny_model's shape
LLAMA = dict(norm="rmsnorm", activation="swiglu", parallel_residual=False, rotary_pct=1.0)
NO_BIASES = dict(attention_bias=False, mlp_bias=False)


def pythia_count() -> int:
    attention = HIDDEN * 3 * HIDDEN + 3 * HIDDEN + HIDDEN * HIDDEN + HIDDEN
    mlp = 2 * HIDDEN * WIDTH + WIDTH + HIDDEN
    norms = 2 * 2 * HIDDEN
    return LAYERS * (attention + mlp + norms) + 2 * HIDDEN + 2 * VOCAB * HIDDEN


# variant -> parameters it adds to (or removes from) the Pythia-shaped tiny model
VARIANTS = {
    "rmsnorm": (dict(norm="rmsnorm"), -(2 * LAYERS + 1) * HIDDEN),  # no norm biases
    "layernorm without bias": (dict(norm_bias=False), -(2 * LAYERS + 1) * HIDDEN),
    # two input halves of WIDTH, one output of WIDTH
    "swiglu": (dict(activation="swiglu"), LAYERS * (HIDDEN * WIDTH + WIDTH)),
    # 2 key/value heads instead of 4: K and V lose half their rows
    "gqa": (dict(num_kv_heads=2), -LAYERS * 2 * (HIDDEN // 2) * (HIDDEN + 1)),
    "mqa": (dict(num_kv_heads=1), -LAYERS * 2 * (3 * HIDDEN // 4) * (HIDDEN + 1)),
    "tied": (dict(tie_word_embeddings=True), -VOCAB * HIDDEN),
    "no attention bias": (dict(attention_bias=False), -LAYERS * 4 * HIDDEN),
    "no mlp bias": (dict(mlp_bias=False), -LAYERS * (WIDTH + HIDDEN)),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_each_variant_changes_the_parameter_count_as_gpt_neox(variant):
    overrides, change = VARIANTS[variant]
    assert tiny_model().num_parameters() == pythia_count()
    model = tiny_model(**overrides)
    assert model.num_parameters() == pythia_count() + change
    logits, _ = model(random_tokens(2, 8))
    assert logits.shape == (2, 8, VOCAB)


def test_each_piece_is_its_named_class():
    pythia, llama = tiny_model().gpt_neox.layers[0], tiny_model(**LLAMA).gpt_neox.layers[0]
    assert isinstance(pythia.input_layernorm, torch.nn.LayerNorm)
    assert isinstance(pythia.mlp, MLP) and isinstance(llama.mlp, SwiGLU)
    assert isinstance(llama.input_layernorm, torch.nn.RMSNorm)
    assert llama.mlp.dense_h_to_4h.weight.shape == (2 * WIDTH, HIDDEN)  # [up | gate]
    assert llama.mlp.dense_4h_to_h.weight.shape == (HIDDEN, WIDTH)
    mqa = tiny_model(num_kv_heads=1).gpt_neox.layers[0].attention
    assert isinstance(mqa, Attention)
    assert mqa.query_key_value.weight.shape == ((HEADS + 2) * HIDDEN // HEADS, HIDDEN)
    tied = tiny_model(tie_word_embeddings=True)
    assert tied.embed_out is None and tied.output_weight is tied.gpt_neox.embed_in.weight
    assert "embed_out.weight" not in tied.state_dict()


def test_rmsnorm_by_hand():
    norm = make_norm(ModelConfig(vocab_size=8, hidden_size=2, num_attention_heads=1, **LLAMA))
    with torch.no_grad():
        norm.weight.copy_(torch.tensor([2.0, 0.5]))
    # x = (3, 4): root mean square sqrt((9 + 16) / 2 + eps), eps gpt-neox's default 1e-8
    rms = math.sqrt(12.5 + 1e-8)
    expected = [2.0 * 3 / rms, 0.5 * 4 / rms]
    assert norm(torch.tensor([[3.0, 4.0]])).tolist()[0] == pytest.approx(expected, rel=1e-6)


def test_swiglu_by_hand():
    config = ModelConfig(
        vocab_size=8, hidden_size=2, num_attention_heads=1, intermediate_size=1, rotary_pct=1.0
    )
    mlp = SwiGLU(config)
    with torch.no_grad():
        mlp.dense_h_to_4h.weight.copy_(torch.tensor([[1.0, 2.0], [0.5, -1.0]]))  # up; gate
        mlp.dense_h_to_4h.bias.copy_(torch.tensor([0.1, 0.2]))
        mlp.dense_4h_to_h.weight.copy_(torch.tensor([[3.0], [-2.0]]))
        mlp.dense_4h_to_h.bias.copy_(torch.tensor([0.0, 1.0]))
    x = (1.0, 1.5)
    up = 1.0 * x[0] + 2.0 * x[1] + 0.1  # 4.1
    gate = 0.5 * x[0] - 1.0 * x[1] + 0.2  # -0.8
    hidden = up * gate / (1 + math.exp(-gate))  # up * silu(gate)
    expected = [3.0 * hidden, -2.0 * hidden + 1.0]
    assert mlp(torch.tensor([x])).tolist()[0] == pytest.approx(expected, rel=1e-6)


def test_kv_heads_equal_to_heads_is_pythias_attention():
    torch.manual_seed(0)
    pythia = GPTNeoX(ModelConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_attention_heads=HEADS))
    torch.manual_seed(0)
    explicit = GPTNeoX(
        ModelConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, num_attention_heads=HEADS, num_kv_heads=HEADS
        )
    )
    ids = random_tokens(2, 16)
    assert torch.equal(pythia(ids)[0], explicit(ids)[0])


def test_grouped_query_attention_is_full_attention_with_shared_heads():
    """A 2-kv-head model computes what a 4-head model computes whose heads 0, 1 share one key and
    value and heads 2, 3 another."""
    grouped = tiny_model(num_kv_heads=2)
    full = tiny_model()
    head_dim, group = HIDDEN // HEADS, HEADS // 2
    state = grouped.state_dict()
    for layer in range(LAYERS):
        for kind in ("weight", "bias"):
            name = f"gpt_neox.layers.{layer}.attention.query_key_value.{kind}"
            rows = state[name].unflatten(0, (2, group + 2, head_dim))  # [kv][q, q, k, v][dim]
            per_head = [
                torch.stack((rows[kv, q], rows[kv, group], rows[kv, group + 1]))
                for kv in range(2)
                for q in range(group)
            ]
            state[name] = torch.stack(per_head).flatten(0, 2)  # [head][q, k, v][dim]
    full.load_state_dict(state)
    ids = random_tokens(2, 16)
    torch.testing.assert_close(grouped(ids)[0], full(ids)[0], rtol=0, atol=1e-5)


def test_grouped_kv_cache_generation_equals_recomputing():
    model = tiny_model(num_kv_heads=1, **LLAMA)
    prompt = random_tokens(2, 7)
    ours = generated(model, prompt, 12, temperature=0)
    assert torch.equal(ours, greedy_without_cache(model, prompt, 12))


def test_tied_head_trains_the_embedding():
    model = tiny_model(tie_word_embeddings=True, chunked_cross_entropy=True).train()
    _, loss = model(random_tokens(2, 8), random_tokens(2, 8, seed=2))
    loss.backward()
    grad = model.gpt_neox.embed_in.weight.grad
    assert grad is not None and (grad != 0).sum() > 8 * HIDDEN  # not only the looked-up rows


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(num_kv_heads=3), "num-kv-heads 3 does not divide num-attention-heads 4"),
        (dict(norm="scalenorm"), "unknown norm 'scalenorm'"),
        (dict(activation="geglu"), "unknown activation 'geglu'"),
    ],
)
def test_bad_variant_is_an_error(overrides, message):
    with pytest.raises(NeoxlabError, match=message):
        ModelConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_attention_heads=HEADS, **overrides)


def llama_copy(model: GPTNeoX):
    """transformers.LlamaForCausalLM with our weights, through hf_llama's conversion."""
    transformers = pytest.importorskip("transformers")
    entries = llama_config(model.config)
    entries = {k: v for k, v in entries.items() if k not in ("architectures", "model_type")}
    hf_model = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**entries, bos_token_id=None, eos_token_id=None)
    )
    weights = to_llama_weights(model.state_dict(), model.config)
    missing, unexpected = hf_model.load_state_dict(weights, strict=False)
    assert not unexpected and missing == (["lm_head.weight"] if model.embed_out is None else [])
    return hf_model.eval()


@pytest.mark.parametrize(
    "overrides",
    [
        dict(rms_norm_eps=1e-6, **NO_BIASES),  # Llama 2
        dict(num_kv_heads=2, rotary_emb_base=500.0, **NO_BIASES),  # Mistral-like
        dict(num_kv_heads=1, tie_word_embeddings=True),  # MQA, tied, biases
    ],
)
def test_llama_shaped_model_matches_transformers_llama(overrides):
    model = tiny_model(**LLAMA, **overrides)
    hf_model = llama_copy(model)
    ids = random_tokens(2, 20)
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[0], hf_model(ids).logits, rtol=0, atol=1e-5)
    prompt = random_tokens(2, 6, seed=3)
    hf_tokens = hf_model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        do_sample=False,
        max_new_tokens=12,
        min_new_tokens=12,
        pad_token_id=0,
    )
    assert torch.equal(generated(model, prompt, 12, temperature=0), hf_tokens[:, 6:])
    # and back: the Llama tensors give model.py's state_dict exactly
    back = from_llama_weights(to_llama_weights(model.state_dict(), model.config), model.config)
    assert back.keys() == model.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())


# ---- the config keys (gpt-neox's names) -------------------------------------------------------


def keyed_model(*overrides: str) -> GPTNeoX:
    config = load_config([], ["hidden-size=64", "num-attention-heads=4", *overrides])
    return GPTNeoX(model_config(config, VOCAB))


def test_each_key_builds_its_piece():
    layer = keyed_model("norm=rmsnorm", "rms-norm-epsilon=1e-6").gpt_neox.layers[0]
    assert isinstance(layer.input_layernorm, torch.nn.RMSNorm) and layer.input_layernorm.eps == 1e-6
    layer = keyed_model("use-bias-in-norms=false").gpt_neox.layers[0]
    assert layer.input_layernorm.bias is None
    attention = keyed_model("num-kv-heads=1", "use-bias-in-attn-linear=false").gpt_neox.layers[0]
    assert attention.attention.query_key_value.weight.shape == (6 * 16, 64)
    assert attention.attention.query_key_value.bias is None
    assert attention.attention.dense.bias is None and attention.mlp.dense_h_to_4h.bias is not None
    assert keyed_model("use-bias-in-mlp=false").gpt_neox.layers[0].mlp.dense_4h_to_h.bias is None
    tied = keyed_model("no-weight-tying=false")
    assert tied.output_weight is tied.gpt_neox.embed_in.weight
    assert keyed_model("rotary-pct=1.0").config.rotary_ndims == 16


@pytest.mark.parametrize(
    ("overrides", "half"),
    [
        # gpt-neox's default 4 x hidden-size: ⌊⅔ x 256⌋ = 170 for both halves, 85 each
        ([], 85),
        # Llama-7B in gpt-neox's configs: ⌊⅔ x 32768⌋ = 21845, rounded to 2 x 256: 22016
        (["hidden-size=4096", "intermediate-size=32768", "mlp-multiple-of=256"], 11008),
        # Mistral-7B's 14336 per half: intermediate-size 3 x 14336
        (["hidden-size=4096", "intermediate-size=43008"], 14336),
    ],
)
def test_swiglu_is_sized_as_gpt_neox_sizes_it(overrides, half):
    config = load_config([], ["activation=swiglu", "hidden-size=64", *overrides])
    assert mlp_widths(config) == (2 * half, half)


def test_gelu_mlp_width_is_intermediate_size_rounded_to_the_multiple():
    assert mlp_width(load_config([], ["hidden-size=64"])) == 256  # Pythia: 4 x hidden-size
    assert mlp_width(load_config([], ["intermediate-size=100", "mlp-multiple-of=64"])) == 128


def dry_run_parameters(capsys, *overrides: str) -> int:
    assert main(["train", "--dry-run", *overrides]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("parameters: "))
    return int(line.split()[1].replace(",", ""))


SEVEN_B = ["hidden-size=4096", "num-layers=32", "num-attention-heads=32", "seq-length=4096"]
LLAMA_KEYS = ["norm=rmsnorm", "activation=swiglu", "gpt-j-residual=false", "rotary-pct=1"]
LLAMA_KEYS += ["use-bias-in-attn-linear=false", "use-bias-in-mlp=false", "vocab-size=32000"]


def test_dry_run_gives_the_published_llama_2_and_mistral_counts(capsys):
    llama_2 = [*SEVEN_B, *LLAMA_KEYS, "intermediate-size=32768", "mlp-multiple-of=256"]
    assert dry_run_parameters(capsys, *llama_2) == 6_738_415_616
    mistral = [*SEVEN_B, *LLAMA_KEYS, "intermediate-size=43008", "num-kv-heads=8"]
    assert dry_run_parameters(capsys, *mistral) == 7_241_732_096


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("num-kv-heads=3", "num-kv-heads 3 does not divide num-attention-heads 4"),
        ("norm=scalenorm", "norm must be one of"),
        ("activation=geglu", "activation must be one of"),
        ("mlp-multiple-of=0", "mlp-multiple-of must be positive"),
    ],
)
def test_bad_architecture_key_is_one_line(capsys, override, message):
    assert main(["train", "--dry-run", "num-attention-heads=4", override]) == 2
    error = capsys.readouterr().err
    assert message in error, error


def test_exact_resume_with_the_other_variants(tiny_overrides):
    """LayerNorm without bias, SwiGLU, multi-query attention and a tied head, parallel residual:
    a run stopped and resumed ends with the weights of the run that was not."""
    overrides = [*tiny_overrides, "train-iters=4", "save-interval=2", "eval-interval=4"]
    overrides += ["use-bias-in-norms=false", "activation=swiglu", "num-kv-heads=1"]
    overrides += ["no-weight-tying=false", "hidden-dropout=0.1", "sample-tokens=0"]

    def run(*extra: str, **kwargs):
        config = load_config([], [*overrides, *extra])
        return train(config, progress=False, log=lambda _: None, **kwargs)

    full = run("run-name=full")
    part = run("run-name=part", "exit-interval=2")
    resumed = run(resume=part.run_dir)
    assert resumed.finished and resumed.step == 4
    last = "checkpoints/step_0000004/model.safetensors"
    a, b = (load_file(result.run_dir / last) for result in (full, resumed))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("base", ["shakespeare.yml", "code_completion.yml"])
def test_architecture_experiment_files_build_their_pieces(base):
    configs = Path(__file__).resolve().parents[1] / "configs"

    def built(experiment: str) -> GPTNeoX:
        config = load_config([configs / base, configs / "experiments" / experiment])
        with torch.device("meta"):
            return GPTNeoX(model_config(config, 512))

    llama = built("llama.yml")
    assert export_class(llama.config) == "LlamaForCausalLM"
    assert not llama.config.attention_bias and not llama.config.mlp_bias
    assert isinstance(built("rmsnorm.yml").gpt_neox.final_layer_norm, torch.nn.RMSNorm)
    assert isinstance(built("swiglu.yml").gpt_neox.layers[0].mlp, SwiGLU)
    assert built("gqa.yml").config.num_kv_heads == 2
    assert built("tied_embeddings.yml").embed_out is None

"""The chunked (fused linear + cross-entropy) training loss: the plain loss, to 1e-6."""

import pytest
import torch
import torch.nn.functional as F
from test_algorithms import saved_for_backward

from neoxlab import model as model_module
from neoxlab.config import Config, load_config, model_config
from neoxlab.memory import activation_bytes
from neoxlab.model import IGNORE_INDEX, GPTNeoX, LinearCrossEntropy, ModelConfig
from neoxlab.tracking import read_metrics
from neoxlab.trainer import train

VOCAB = 96


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 7 rows of a 96-token vocabulary: several chunks and a ragged last one."""
    monkeypatch.setattr(model_module, "LOSS_CHUNK_ELEMENTS", {"other": 7 * VOCAB})


def tiny_model(chunked: bool) -> GPTNeoX:
    torch.manual_seed(0)
    config = ModelConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_layers=2,
        num_attention_heads=2,
        max_position_embeddings=16,
        chunked_cross_entropy=chunked,
    )
    return GPTNeoX(config)


def test_linear_cross_entropy_matches_plain_loss_and_gradients(small_chunks):
    torch.manual_seed(1)
    hidden = torch.randn(45, 32, requires_grad=True)
    weight = torch.randn(VOCAB, 32, requires_grad=True)
    targets = torch.randint(0, VOCAB, (45,))
    targets[::4] = IGNORE_INDEX
    chunked = LinearCrossEntropy.apply(hidden, weight, targets)
    chunked.backward()
    chunked_grads = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    plain = F.cross_entropy((hidden @ weight.T).float(), targets, ignore_index=IGNORE_INDEX)
    plain.backward()
    assert abs(chunked.item() - plain.item()) <= 1e-6 * max(1.0, abs(plain.item()))
    assert torch.allclose(chunked_grads[0], hidden.grad, rtol=0, atol=1e-6)
    assert torch.allclose(chunked_grads[1], weight.grad, rtol=0, atol=1e-6)


def test_model_loss_and_every_gradient_match_the_plain_path(small_chunks):
    inputs = torch.randint(0, VOCAB, (3, 16))
    targets = torch.randint(0, VOCAB, (3, 16))
    targets[0, :5] = IGNORE_INDEX
    results = []
    for chunked in (False, True):
        model = tiny_model(chunked).train()
        logits, loss = model(inputs, targets)
        assert (logits is None) == chunked  # training with the chunked loss keeps no logits
        loss.backward()
        results.append((loss.item(), {n: p.grad for n, p in model.named_parameters()}))
    (plain_loss, plain_grads), (chunked_loss, chunked_grads) = results
    assert abs(chunked_loss - plain_loss) <= 1e-6 * plain_loss
    for name, grad in plain_grads.items():
        assert torch.allclose(chunked_grads[name], grad, rtol=1e-5, atol=1e-6), name


@pytest.mark.parametrize(
    ("setting", "chunked"), [("auto", True), (None, True), ("false", False), (True, True)]
)
def test_the_chunked_loss_is_the_default_on_a_cpu(setting, chunked):
    """auto (the default, None: no key) trains on a CPU with the chunked loss, where it
    measured faster; false and true (a YAML boolean too) decide it either way."""
    overrides = [] if setting is None else [f"chunked-cross-entropy={str(setting).lower()}"]
    config = load_config([], overrides)
    assert config.chunked_cross_entropy == (str(setting).lower() if setting else "auto")
    torch.manual_seed(0)
    model = GPTNeoX(model_config(config, VOCAB, train_device_type="cpu")).train()
    inputs = torch.randint(0, VOCAB, (2, 16))
    logits, _ = model(inputs, inputs)
    assert (logits is None) == chunked
    # auto stays off for a GPU until measured there, and for inference
    expected_elsewhere = setting in ("true", True)
    assert model_config(config, VOCAB, "cuda").chunked_cross_entropy == expected_elsewhere
    assert model_config(config, VOCAB).chunked_cross_entropy == expected_elsewhere


def test_without_gradients_the_chunked_model_returns_logits(small_chunks):
    model = tiny_model(True).eval()
    inputs = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        logits, loss = model(inputs, inputs)
    assert logits is not None and logits.shape == (2, 16, VOCAB)
    expected = F.cross_entropy(logits.view(-1, VOCAB), inputs.view(-1))
    assert loss.item() == pytest.approx(expected.item(), abs=1e-6)


def test_chunked_loss_follows_autocast_dtype(small_chunks):
    """Under bf16 autocast the matmuls run in bf16, as the plain path's do."""
    inputs = torch.randint(0, VOCAB, (2, 16))
    losses = []
    for chunked in (False, True):
        model = tiny_model(chunked).train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            _, loss = model(inputs, inputs)
        loss.backward()
        assert model.embed_out.weight.grad.dtype == torch.float32
        losses.append(loss.item())
    assert losses[1] == pytest.approx(losses[0], rel=1e-3)


def test_chunked_loss_compiles_without_graph_breaks(small_chunks):
    """fullgraph=True fails on any graph break; aot_eager traces forward and backward on CPU,
    under autocast as training on a GPU runs it."""
    model = tiny_model(True).train()
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    inputs = torch.randint(0, VOCAB, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = compiled(inputs, inputs)
        _, eager = model(inputs, inputs)
    loss.backward()
    assert loss.item() == pytest.approx(eager.item(), abs=1e-6)
    assert all(p.grad is not None for p in model.parameters())


def test_memory_estimate_counts_what_the_chunked_loss_saves():
    config = Config(
        hidden_size=64,
        num_layers=2,
        num_attention_heads=4,
        seq_length=64,
        chunked_cross_entropy="true",
    )
    vocab = 512
    measured, logits = saved_for_backward(GPTNeoX(model_config(config, vocab)).train(), vocab)
    assert logits is None
    estimate = activation_bytes(config, vocab, micro_batch=2, size=4)
    assert abs(estimate - measured) / measured < 0.05, (estimate, measured)
    plain = activation_bytes(
        Config(**{**config.__dict__, "chunked_cross_entropy": "false"}), vocab, 2, 4
    )
    assert estimate < plain


def test_training_with_the_chunked_loss_gives_the_same_losses(tiny_overrides, monkeypatch):
    monkeypatch.setattr(model_module, "LOSS_CHUNK_ELEMENTS", {"other": 40 * 384})  # several chunks
    common = [*tiny_overrides, "train-iters=4", "log-interval=1", "sample-tokens=0", "save=false"]
    losses = []
    for chunked in ("false", "true"):
        config = load_config([], [*common, f"chunked-cross-entropy={chunked}"])
        result = train(config, progress=False, log=lambda _: None)
        losses.append([m["train/loss"] for m in read_metrics(result.run_dir) if "train/loss" in m])
    assert losses[1] == pytest.approx(losses[0], abs=1e-5)


@pytest.mark.slow
def test_chunked_loss_under_fsdp_matches_one_plain_process(tiny_corpus, tmp_path, monkeypatch):
    """The custom autograd function sees FSDP2's unsharded head weight and returns its
    gradient through FSDP's reduce-scatter: 2 ranks give the one-process plain-loss run."""
    from test_distributed import OVERRIDES, TOLERANCE, losses, only_run, torchrun

    overrides = [*OVERRIDES, f"data-path={tiny_corpus}", "sample-tokens=0", "save=false"]
    monkeypatch.chdir(tmp_path)
    reference = train(load_config([], overrides), progress=False, log=lambda _: None).run_dir
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    torchrun([*overrides, "distributed=fsdp", "chunked-cross-entropy=true"], sharded)
    expected, got = losses(reference), losses(only_run(sharded))
    assert sorted(got) == sorted(expected)
    for step, loss in expected.items():
        assert got[step] == pytest.approx(loss, abs=TOLERANCE), step

"""Training algorithms: every optimizer and schedule trains and resumes exactly; parameter
grouping, Muon, Lion, schedule shapes, clipping, experiment files and the --dry-run estimate."""

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from neoxlab.checkpoint import load_training_state
from neoxlab.cli import main
from neoxlab.config import Config, load_config, model_config
from neoxlab.errors import NeoxlabError
from neoxlab.memory import activation_bytes, describe, optimizer_state_bytes
from neoxlab.model import GPTNeoX
from neoxlab.optim import (
    OPTIMIZERS,
    SCHEDULES,
    Lion,
    MuonWithAdamW,
    block_matrices,
    build_optimizer,
    clip_gradients,
    lr_at,
    parameter_groups,
    set_lr,
)
from neoxlab.tracking import read_metrics
from neoxlab.trainer import Trainer

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
EXPERIMENTS = sorted((CONFIGS / "experiments").glob("*.yml"))
BASES = [p for p in (CONFIGS / "shakespeare.yml", CONFIGS / "code_completion.yml") if p.is_file()]

# Settings that make each optimizer learn within a dozen steps on the tiny model.
TINY_OPTIMIZER = {
    "Adam": ["weight-decay=0.1"],
    "AdamW": ["weight-decay=0.1"],
    "SGD": ["lr=0.3", "optimizer.params.momentum=0.9", "optimizer.params.nesterov=true"],
    "Lion": ["lr=1e-3", "weight-decay=0.3"],
    "Adafactor": ["lr=1e-2"],
    "Muon": ["optimizer.params.muon_lr=0.02", "weight-decay=0.01"],
    "AdamW8bit": ["weight-decay=0.1"],  # bitsandbytes' CPU kernels
}
CASES = [(name, "cosine") for name in OPTIMIZERS] + [
    ("AdamW", schedule) for schedule in SCHEDULES if schedule != "cosine"
]


def tiny_gptneox(**overrides) -> GPTNeoX:
    torch.manual_seed(0)
    config = Config(hidden_size=32, num_layers=2, num_attention_heads=2, seq_length=16, **overrides)
    return GPTNeoX(model_config(config, 128))


def named(model: torch.nn.Module, parameters) -> set[str]:
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)] for p in parameters}


def fit(trainer: Trainer) -> Trainer:
    trainer.run()
    return trainer


# ---- every optimizer and schedule: it learns, and resume is exact --------------------------------


@pytest.mark.parametrize(("optimizer", "schedule"), CASES, ids=[f"{o}-{s}" for o, s in CASES])
def test_trains_and_resumes_exactly(tiny_overrides, optimizer, schedule):
    overrides = [
        *tiny_overrides,
        f"optimizer.type={optimizer}",
        f"lr-decay-style={schedule}",
        *TINY_OPTIMIZER[optimizer],
        "min-lr=1e-5",
        "train-iters=12",
        "save-interval=6",
        "log-interval=1",
        "eval-interval=100",
        "eval-iters=2",
        "sample-tokens=0",
    ]
    config = load_config([], overrides)
    quiet = {"progress": False, "log": lambda _: None}
    full = fit(Trainer(config, **quiet))
    losses = [m["train/loss"] for m in read_metrics(full.run_dir) if "train/loss" in m]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < losses[0] - 0.15, losses  # it learns

    # Resume a copy of the run from its step-6 checkpoint and train the same last 6 steps.
    copy = full.run_dir.with_name(full.run_dir.name + "-resumed")
    step6 = Path("checkpoints", "step_0000006")
    shutil.copytree(full.run_dir / step6, copy / step6)
    resumed = Trainer(config, resume=copy, **quiet)
    assert resumed.step == 6
    resumed.run()
    a = load_file(str(full.run_dir / "checkpoints/step_0000012/model.safetensors"))
    b = load_file(str(copy / "checkpoints/step_0000012/model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # bitwise, fp32 on CPU
    state_a = load_training_state(full.run_dir / "checkpoints/step_0000012")["optimizer"]
    state_b = load_training_state(copy / "checkpoints/step_0000012")["optimizer"]
    assert_same_state(state_a, state_b)


def assert_same_state(a, b):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            assert_same_state(a[key], b[key])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same_state(x, y)
    else:
        assert a == b


def test_registries_are_the_config_choices():
    config = load_config([], ["optimizer.type=lion", "lr-decay-style=wsd"])
    assert config.optimizer["type"] == "Lion"
    with pytest.raises(NeoxlabError, match="Adafactor, Muon"):
        load_config([], ["optimizer.type=Nadam"])
    with pytest.raises(NeoxlabError, match="wsd, inverse_sqrt"):
        load_config([], ["lr-decay-style=exponential"])


# ---- parameter groups and Muon -------------------------------------------------------------------


def test_weight_decay_groups_embeddings_by_flag():
    model = tiny_gptneox()
    decay, no_decay = parameter_groups(model, 0.1)
    decayed = named(model, decay["params"])
    assert "gpt_neox.embed_in.weight" in decayed and "embed_out.weight" in decayed
    assert all(p.dim() >= 2 for p in decay["params"])
    assert all(p.dim() == 1 for p in no_decay["params"])  # every norm weight and bias
    decay, no_decay = parameter_groups(model, 0.1, decay_embeddings=False)
    assert "gpt_neox.embed_in.weight" in named(model, no_decay["params"])
    assert "embed_out.weight" in named(model, decay["params"])  # the head is no embedding
    config = Config(weight_decay=0.1, weight_decay_embeddings=False)
    groups = build_optimizer(model, config).param_groups
    assert "gpt_neox.embed_in.weight" in named(model, groups[1]["params"])
    assert groups[1]["weight_decay"] == 0.0


def test_muon_takes_only_block_matrices():
    model = tiny_gptneox()
    config = Config(optimizer={"type": "Muon", "params": {}}, lr=1e-3, weight_decay=0.1)
    optimizer = build_optimizer(model, config)
    assert isinstance(optimizer, MuonWithAdamW)
    muon = named(model, optimizer.muon.param_groups[0]["params"])
    adamw = set().union(*(named(model, g["params"]) for g in optimizer.adamw.param_groups))
    assert muon == {
        f"gpt_neox.layers.{i}.{m}.weight"
        for i in range(2)
        for m in (
            "attention.query_key_value",
            "attention.dense",
            "mlp.dense_h_to_4h",
            "mlp.dense_4h_to_h",
        )
    }
    assert {"gpt_neox.embed_in.weight", "embed_out.weight"} <= adamw
    assert not muon & adamw and muon | adamw == {n for n, _ in model.named_parameters()}
    assert named(model, block_matrices(model)) == muon
    # one schedule for both: Muon's group runs at muon_lr / lr times the AdamW rate
    set_lr(optimizer, 5e-4)
    assert optimizer.muon.param_groups[0]["lr"] == pytest.approx(0.02 * 0.5)
    assert [g["lr"] for g in optimizer.adamw.param_groups] == [5e-4, 5e-4]


def test_newton_schulz_orthogonalises():
    # One Muon step without momentum or decay moves the weight by exactly the orthogonalised
    # gradient (a wide matrix: torch's aspect-ratio lr adjustment is 1).
    torch.manual_seed(0)
    weight = torch.nn.Parameter(torch.zeros(32, 64))
    gradient = torch.randn(32, 64) * torch.logspace(0, 2, 64)  # badly conditioned
    weight.grad = gradient.clone()
    torch.optim.Muon([weight], lr=1.0, momentum=0.0, nesterov=False, weight_decay=0.0).step()
    update = -weight.detach().float()
    singular = torch.linalg.svdvals(update)
    raw = torch.linalg.svdvals(gradient)
    assert raw.max() / raw.min() > 10
    assert singular.min() > 0.5 and singular.max() < 1.3, singular


def test_muon_steps_through_grad_scaler():
    """fp16 on a T4 steps through GradScaler: the two-optimizer wrapper must work with it."""
    model = tiny_gptneox()
    optimizer = build_optimizer(model, Config(optimizer={"type": "Muon", "params": {}}))
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    _, loss = model(torch.randint(0, 128, (2, 16)), torch.randint(0, 128, (2, 16)))
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    before = [p.detach().clone() for p in model.parameters()]
    scaler.step(optimizer)
    scaler.update()
    assert all(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    assert set(optimizer.state_dict()) == {"muon", "adamw"}


def test_lion_update_by_hand():
    param = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5]))
    optimizer = Lion([param], lr=0.1, betas=(0.9, 0.99), weight_decay=0.5)
    param.grad = torch.tensor([0.5, 0.1, -0.2])
    optimizer.step()  # momentum 0: the step is -lr * sign(grad), after decay by 1 - 0.1 * 0.5
    assert torch.allclose(param, torch.tensor([0.85, -2.0, 0.575]))
    param.grad = torch.tensor([-0.01, 0.002, 0.001])
    optimizer.step()  # 0.9 * m + 0.1 * g = [0.0035, 0.0011, -0.0017]: momentum wins element 0
    assert torch.allclose(param, torch.tensor([0.7075, -2.0, 0.64625]))
    momentum = optimizer.state[param]["exp_avg"]
    assert torch.allclose(momentum, torch.tensor([0.00485, 0.00101, -0.00197]))


# ---- schedules -----------------------------------------------------------------------------------


def test_every_schedule_warms_up_and_stays_between_min_lr_and_lr():
    for schedule in SCHEDULES:
        config = Config(lr=1.0, min_lr=0.1, train_iters=100, warmup=10, lr_decay_style=schedule)
        assert lr_at(0, config) == pytest.approx(0.1) and lr_at(9, config) == pytest.approx(1.0)
        assert all(0.1 - 1e-12 <= lr_at(s, config) <= 1.0 for s in range(10, 200)), schedule


def test_wsd_plateau_then_linear_cooldown():
    config = Config(lr=1.0, min_lr=0.1, train_iters=100, warmup=10, lr_decay_style="wsd")
    assert all(
        lr_at(s, config) == pytest.approx(1.0) for s in range(10, 81)
    )  # stable until the last 20%
    assert lr_at(90, config) == pytest.approx(0.55)  # halfway down the cooldown
    assert lr_at(99, config) == pytest.approx(0.1 + 0.9 * 0.05)
    assert lr_at(100, config) == pytest.approx(0.1)
    short = Config(lr=1.0, train_iters=100, warmup=0, lr_decay_style="wsd", wsd_decay_fraction=0.5)
    assert lr_at(49, short) == 1.0 and lr_at(75, short) == pytest.approx(0.5)


def test_inverse_sqrt_formula():
    config = Config(lr=1.0, min_lr=0.0, train_iters=10, warmup=16, lr_decay_style="inverse_sqrt")
    assert [lr_at(s, config) for s in (16, 64, 256)] == pytest.approx([1.0, 0.5, 0.25])
    floored = Config(lr=1.0, min_lr=0.3, warmup=16, lr_decay_style="inverse_sqrt")
    assert lr_at(256, floored) == 0.3
    no_warmup = Config(lr=1.0, warmup=0, lr_decay_style="inverse_sqrt")
    assert [lr_at(s, no_warmup) for s in (0, 1, 4)] == pytest.approx([1.0, 1.0, 0.5])


# ---- clipping ------------------------------------------------------------------------------------


def test_clipping_by_value_bounds_every_element_and_reports_the_norm():
    model = tiny_gptneox()
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    norm_before = torch.linalg.vector_norm(
        torch.cat([p.grad.flatten() for p in model.parameters()])
    )
    config = Config(gradient_clipping=0.05, gradient_clipping_type="value")
    reported = clip_gradients(model.parameters(), config)
    assert reported == pytest.approx(float(norm_before), rel=1e-5)
    assert max(float(p.grad.abs().max()) for p in model.parameters()) == pytest.approx(0.05)
    by_norm = Config(gradient_clipping=1.0, gradient_clipping_type="norm")
    clip_gradients(model.parameters(), by_norm)
    total = torch.linalg.vector_norm(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert float(total) == pytest.approx(1.0, rel=1e-4)
    with pytest.raises(NeoxlabError, match="gradient-clipping-type"):
        load_config([], ["gradient-clipping-type=max"])


# ---- experiment files ----------------------------------------------------------------------------


@pytest.mark.parametrize("base", BASES, ids=lambda p: p.stem)
def test_experiment_files_merge_onto_base_configs(base):
    stems = {p.stem for p in EXPERIMENTS}
    assert {"adamw", "sgd", "lion", "adafactor", "muon"} <= stems
    assert {"constant", "linear", "cosine", "wsd", "inverse_sqrt"} <= stems
    for experiment in EXPERIMENTS:
        config = load_config([base, experiment])
        build_optimizer(tiny_gptneox(), config)  # torch accepts the optimizer params
    lion = load_config([base, CONFIGS / "experiments" / "lion.yml"])
    assert lion.optimizer == {"type": "Lion", "params": {"betas": [0.95, 0.98]}}
    stacked = load_config([base, *(CONFIGS / "experiments" / f for f in ("muon.yml", "wsd.yml"))])
    assert stacked.optimizer["type"] == "Muon" and stacked.lr_decay_style == "wsd"


def test_a_new_optimizer_type_drops_the_old_params(tmp_path):
    adam = tmp_path / "adam.yml"
    adam.write_text("optimizer: {type: AdamW, params: {betas: [0.9, 0.95], eps: 1.0e-8}}\n")
    config = load_config([adam, CONFIGS / "experiments" / "sgd.yml"])
    assert config.optimizer["params"] == {"momentum": 0.9, "nesterov": True}
    config = load_config([adam], ["optimizer.params.eps=1e-6"])  # same type: params merge
    assert config.optimizer["params"] == {"betas": [0.9, 0.95], "eps": 1e-6}


# ---- --dry-run and the memory estimate -----------------------------------------------------------

SHAPE = [
    "hidden-size=64",
    "num-layers=2",
    "num-attention-heads=4",
    "seq-length=32",
    "vocab-size=1000",
    "micro-batch-size=2",
    "global-batch-size=8",
    "train-iters=50",
]


def test_dry_run_prints_the_plan_and_creates_nothing(tmp_path, capsys):
    assert main(["train", *SHAPE, "--dry-run"]) == 0
    out = capsys.readouterr().out
    # vocab 1000 -> 1024 rows; embed_in and embed_out 1024 x 64 each; per block 2 LayerNorms
    # (256), QKV 64 x 192 + 192, dense 64 x 64 + 64, MLP 64 x 256 + 256 and 256 x 64 + 64
    per_block = 256 + 12_480 + 4_160 + 16_640 + 16_448
    total = 2 * 1024 * 64 + 2 * per_block + 128
    assert f"parameters: {total:,} ({total - 1024 * 64:,} without" in out
    assert "tokens per step: 256 (8 sequences = 4 micro-batches of 2 x 32)" in out
    assert "optimizer steps: 50; tokens in total: 12,800" in out
    assert not (tmp_path / "runs").exists()
    assert main(["train", *SHAPE, "micro-batch-size=8", "--dry-run"]) == 0
    assert "(8 sequences = 1 micro-batch of 8 x 32)" in capsys.readouterr().out


def test_dry_run_memory_follows_checkpointing_precision_and_optimizer():
    plain = describe(load_config([], [*SHAPE, "precision=fp16"]))
    checkpointed = describe(
        load_config([], [*SHAPE, "precision=fp16", "checkpoint-activations=true"])
    )
    fp32 = describe(load_config([], [*SHAPE, "precision=fp32"]))
    assert checkpointed.activation_bytes < plain.activation_bytes < fp32.activation_bytes
    assert plain.half_weight_bytes > 0 and fp32.half_weight_bytes == 0
    assert plain.weight_bytes == plain.gradient_bytes == 4 * plain.parameters
    assert plain.optimizer_state_bytes == 2 * plain.weight_bytes  # Adam: two moments
    lion = describe(load_config([], [*SHAPE, "optimizer.type=Lion"]))
    assert lion.optimizer_state_bytes == lion.weight_bytes


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_optimizer_state_estimate_matches_torch(name):
    params = {"SGD": {"momentum": 0.9}}.get(name, {})
    config = Config(optimizer={"type": name, "params": params}, lr=1e-3)
    model = tiny_gptneox()
    optimizer = build_optimizer(model, config)
    _, loss = model(torch.randint(0, 128, (2, 16)), torch.randint(0, 128, (2, 16)))
    loss.backward()
    optimizer.step()
    states = (
        [optimizer.state]
        if not isinstance(optimizer, MuonWithAdamW)
        else [o.state for o in optimizer.optimizers]
    )
    actual = sum(
        t.numel() * t.element_size()
        for state in states
        for per_param in state.values()
        for key, t in per_param.items()
        if isinstance(t, torch.Tensor) and key != "step"
    )
    assert optimizer_state_bytes(model, config) == actual


def saved_for_backward(model: GPTNeoX, vocab: int) -> tuple[int, torch.Tensor | None]:
    """Bytes of the distinct non-parameter storages autograd saves in a forward pass of batch
    2 x 64 random tokens, and the logits it returns."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    tokens = torch.randint(0, vocab, (2, 64))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits, _ = model(tokens, tokens)
    return sum(saved.values()), logits


@pytest.mark.parametrize(
    "architecture",
    [
        {},
        {"gpt_j_residual": False},
        # Llama-shaped, grouped key/value heads
        {"gpt_j_residual": False, "norm": "rmsnorm", "activation": "swiglu", "num_kv_heads": 2},
    ],
)
def test_activation_estimate_matches_what_autograd_saves(architecture):
    """fp32 on CPU: sum the distinct non-parameter storages autograd saves, plus the logits the
    caller holds, and compare with the documented formula."""
    config = Config(
        hidden_size=64, num_layers=3, num_attention_heads=4, seq_length=64, **architecture
    )
    vocab = 256
    saved, logits = saved_for_backward(GPTNeoX(model_config(config, vocab)).train(), vocab)
    measured = saved + logits.nbytes
    estimate = activation_bytes(config, vocab, micro_batch=2, size=4)
    assert abs(estimate - measured) / measured < 0.05, (estimate, measured)

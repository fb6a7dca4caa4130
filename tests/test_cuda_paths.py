"""The CUDA code paths, run as far as a CPU runs them: torch.compile (inductor's C++ backend),
fp16 autocast with the GradScaler and real overflow, CUDA-graph step marking, the hardware
decisions for a T4, an A100 and an H100 (mocked capability, real decision code), and MFU.
A GPU session then finds only GPU problems (bench/gpu_check.py)."""

import math

import pytest
import torch
from torch.nn.attention import SDPBackend

from neoxlab import runtime as runtime_module
from neoxlab import trainer as trainer_module
from neoxlab.checkpoint import latest_checkpoint, load_weights
from neoxlab.config import load_config
from neoxlab.errors import NeoxlabError
from neoxlab.model import GPTNeoX, ModelConfig
from neoxlab.runtime import Runtime, model_flops_utilization, resolve_runtime
from neoxlab.tracking import read_metrics
from neoxlab.trainer import Trainer

FLASH, EFFICIENT, MATH = (
    SDPBackend.FLASH_ATTENTION,
    SDPBackend.EFFICIENT_ATTENTION,
    SDPBackend.MATH,
)
# The shapes of bench/gpu_check.py --smoke (micro-batches of 4 x 32 tokens, 384 vocabulary
# rows): the same compiled graph, so whichever compiles second finds it in inductor's cache.
SMOKE_SHAPES = [
    "hidden-size=32",
    "num-layers=2",
    "num-attention-heads=2",
    "seq-length=32",
    "max-position-embeddings=32",
    "micro-batch-size=4",
    "global-batch-size=8",
    "train-iters=4",
    "log-interval=1",
    "eval-interval=4",
    "sample-tokens=0",
]


def make_trainer(overrides) -> Trainer:
    return Trainer(load_config([], overrides), progress=False, log=lambda _: None)


def logged(trainer: Trainer, key: str) -> dict[int, float]:
    return {m["step"]: m[key] for m in read_metrics(trainer.run_dir) if key in m}


# ---- torch.compile on the CPU ---------------------------------------------------------------


def test_compiled_training_step_on_the_cpu_trains_like_eager(tiny_overrides):
    """compile: true forced on a CPU: inductor compiles the forward and backward once (no graph
    breaks, no recompiles over steps and micro-batches), the losses and gradient norms are
    eager's, and the checkpoint holds the plain module's names."""
    overrides = [*tiny_overrides, *SMOKE_SHAPES, "save-interval=4"]
    eager = make_trainer([*overrides, "run-name=eager"])
    eager.run()
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    compiled = make_trainer([*overrides, "compile=true", "run-name=compiled"])
    assert compiled.runtime.compile and compiled.runtime.device.type == "cpu"
    compiled.run()
    assert counters["stats"]["unique_graphs"] == 1
    assert not counters["graph_break"]
    for key in ("train/loss", "train/grad_norm", "val/loss"):
        expected, got = logged(eager, key), logged(compiled, key)
        assert got.keys() == expected.keys()
        assert got == pytest.approx(expected, rel=1e-5), key
    weights = load_weights(latest_checkpoint(compiled.run_dir / "checkpoints"))
    assert weights.keys() == compiled.model.state_dict().keys()
    assert not any("_orig_mod" in name for name in weights)


# ---- CUDA graphs: where each step is marked -------------------------------------------------


def test_cuda_graph_steps_are_marked_before_every_training_forward(tiny_overrides, monkeypatch):
    """Under reduce-overhead each micro-batch's forward starts a new CUDA-graph step (outputs
    of the previous replay may then be overwritten): one mark right before each training
    forward, none before evaluation's, and none at all without CUDA graphs."""
    events = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: events.append("mark"))
    forward = GPTNeoX.forward

    def recorded(self, *args, **kwargs):
        events.append("forward" if self.training else "eval")
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(GPTNeoX, "forward", recorded)
    overrides = [*tiny_overrides, *SMOKE_SHAPES, "save=false", "eval-iters=1"]
    make_trainer(overrides).run()
    assert "mark" not in events and events.count("forward") == 4 * 2
    events.clear()
    monkeypatch.setattr(Runtime, "cuda_graphs", property(lambda self: True))
    make_trainer([*overrides, "compile-mode=reduce-overhead"]).run()
    training = [event for event in events if event != "eval"]
    assert training == ["mark", "forward"] * (4 * 2)  # 4 steps of 2 micro-batches


# ---- fp16 autocast and the GradScaler on the CPU --------------------------------------------


def fp16_trainer(overrides, monkeypatch) -> Trainer:
    """A trainer whose runtime is a T4's choice (fp16, eager), on the CPU: the scaler is built
    from the config by the trainer's own code, and autocast runs in fp16 on the CPU."""
    resolve = trainer_module.resolve_runtime

    def fp16_runtime(*args, **kwargs):
        runtime = resolve(*args, **kwargs)
        return Runtime(runtime.device, "fp16", compile=False)

    monkeypatch.setattr(trainer_module, "resolve_runtime", fp16_runtime)
    return make_trainer(overrides)


def test_fp16_overflow_skips_steps_and_backs_off_the_scale(tiny_overrides, monkeypatch):
    """A loss scale of 2^24 overflows fp16 gradients (no poisoning: real overflow): each such
    step is skipped without touching the weights, counted, and halves the scale; then the
    scale fits and training goes on."""
    overrides = [*tiny_overrides, *SMOKE_SHAPES, "train-iters=12", "log-interval=12"]
    trainer = fp16_trainer([*overrides, "save=false", "fp16.initial_scale_power=24"], monkeypatch)
    assert trainer.scaler.is_enabled() and trainer.scaler.get_scale() == 2.0**24
    dtypes = set()
    layer = trainer.model.gpt_neox.layers[0].mlp.dense_h_to_4h
    layer.register_forward_hook(lambda module, inputs, output: dtypes.add(output.dtype))
    weights = [[p.detach().clone() for p in trainer.model.parameters()]]
    count_step = Trainer._count_step

    def snapshot(self, loop):
        weights.append([p.detach().clone() for p in self.model.parameters()])
        count_step(self, loop)

    monkeypatch.setattr(Trainer, "_count_step", snapshot)
    trainer.run()
    unchanged = [
        step
        for step in range(1, 13)
        if all(a.equal(b) for a, b in zip(weights[step - 1], weights[step], strict=True))
    ]
    assert unchanged[0] == 1 and 1 <= len(unchanged) < 12
    assert trainer.skipped_steps == len(unchanged)
    assert trainer.scaler.get_scale() == 2.0 ** (24 - len(unchanged))
    assert dtypes == {torch.float16}  # the matmuls ran in fp16
    assert math.isfinite(logged(trainer, "train/loss")[12])


def test_fp16_dynamic_scale_grows_and_a_static_one_does_not(tiny_overrides, monkeypatch):
    overrides = [*tiny_overrides, *SMOKE_SHAPES, "save=false"]
    dynamic = fp16_trainer(
        [*overrides, "fp16.initial_scale_power=4", "fp16.loss_scale_window=2"], monkeypatch
    )
    dynamic.run()
    assert dynamic.skipped_steps == 0
    assert dynamic.scaler.get_scale() == 2.0 ** (4 + 4 // 2)  # doubled every 2 good steps
    static = fp16_trainer([*overrides, "fp16.loss_scale=16"], monkeypatch)
    static.run()
    assert static.scaler.get_scale() == 16.0


def test_fp16_scale_below_min_loss_scale_stops_the_run(tiny_overrides, monkeypatch):
    """Real overflow from 2^24 halves the scale every step; below min-loss-scale 2^22 (after
    three skips) the run stops at the next check, naming the reason."""
    overrides = [*tiny_overrides, *SMOKE_SHAPES, "train-iters=12", "log-interval=4"]
    overrides += ["save=false", "fp16.initial_scale_power=24", f"fp16.min_loss_scale={2**22}"]
    trainer = fp16_trainer(overrides, monkeypatch)
    with pytest.raises(NeoxlabError, match="step 4: the fp16 loss scale fell below min-loss"):
        trainer.run()
    assert trainer.skipped_steps >= 3


# ---- the hardware decisions for a T4, an A100, an H100 --------------------------------------


@pytest.fixture
def gpu(monkeypatch):
    """Pretend a CUDA GPU of a given compute capability is present."""

    def pretend(capability):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)

    return pretend


@pytest.mark.parametrize(
    ("capability", "precision", "compiled", "kernels", "line"),
    [
        ((7, 5), "fp16", False, (EFFICIENT, MATH), "cuda fp16, memory-efficient attention"),
        ((8, 0), "bf16", True, (FLASH, EFFICIENT, MATH), "cuda bf16 compiled, flash attention"),
        ((9, 0), "bf16", True, (FLASH, EFFICIENT, MATH), "cuda bf16 compiled, flash attention"),
    ],
)
def test_auto_choices_by_compute_capability(gpu, capability, precision, compiled, kernels, line):
    gpu(capability)
    runtime = resolve_runtime("auto", "auto", "auto")
    assert runtime.device.type == "cuda" and runtime.capability == capability
    assert (runtime.precision, runtime.compile, runtime.attention_kernels) == (
        precision,
        compiled,
        kernels,
    )
    assert runtime.describe() == line
    assert torch.get_float32_matmul_precision() == "high"  # TF32


def test_explicit_precisions_and_their_attention_kernels(gpu):
    gpu((7, 5))
    with pytest.raises(NeoxlabError, match="no native bf16"):
        resolve_runtime("cuda", "bf16", "auto")
    t4_fp32 = resolve_runtime("cuda", "fp32", "true", compile_mode="reduce-overhead")
    assert t4_fp32.attention_kernels == (EFFICIENT, MATH)  # flash needs sm 8.0 and half floats
    assert t4_fp32.describe() == "cuda fp32 compiled (reduce-overhead), memory-efficient attention"
    gpu((9, 0))
    assert resolve_runtime("cuda", "fp16", "auto").attention_kernels == (FLASH, EFFICIENT, MATH)
    assert resolve_runtime("cuda", "fp32", "auto").attention_kernels == (EFFICIENT, MATH)
    # bf16 below sm 8.0 has only the math kernel (the memory-efficient one takes fp16/fp32)
    assert runtime_module.attention_kernels("cuda", (7, 5), "bf16") == (MATH,)


def test_the_cpu_compile_default_is_one_named_decision(monkeypatch):
    assert (
        resolve_runtime("cpu", "auto", "auto").compile is runtime_module.COMPILE_ON_CPU_BY_DEFAULT
    )
    for setting in (True, False):
        monkeypatch.setattr(runtime_module, "COMPILE_ON_CPU_BY_DEFAULT", setting)
        assert resolve_runtime("cpu", "auto", "auto").compile is setting
        assert resolve_runtime("cpu", "auto", "false").compile is False
        assert resolve_runtime("cpu", "auto", "true").compile is True
    cpu = resolve_runtime("cpu", "fp16", "auto", notice=lambda _: None)
    assert (cpu.precision, cpu.attention_kernels, cpu.describe()) == (
        "fp32",
        (FLASH, MATH),
        "cpu fp32",
    )


# ---- MFU ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H200", 989e12),
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA A100-SXM4-40GB", 312e12),
        ("Tesla T4", 65e12),
        ("NVIDIA GeForce RTX 4090", None),  # not in the table: no MFU rather than a wrong one
    ],
)
def test_peak_flops_by_gpu_name(monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert Runtime(torch.device("cuda"), "bf16", compile=True).peak_flops() == peak
    assert Runtime(torch.device("cpu"), "fp32", compile=False).peak_flops() is None


def test_pythia_160m_mfu_as_bench_results_define_it():
    """bench/RESULTS.md: (6 x 123,689,472 + 12 x 12 x 768 x 2048) FLOPs per token for the
    Pythia-160M shape; at 450,000 tokens/s on one H100 that is 44.1% MFU, on two 22.0%."""
    shapes = ModelConfig(
        vocab_size=50304,
        hidden_size=768,
        num_layers=12,
        num_attention_heads=12,
        max_position_embeddings=2048,
    )
    with torch.device("meta"):
        model = GPTNeoX(shapes)
    flops = model.flops_per_token(2048)
    assert model.num_parameters(exclude_embeddings=True) == 123_689_472
    assert flops == 6 * 123_689_472 + 12 * 12 * 768 * 2048
    assert model_flops_utilization(flops, 450_000, 989e12, 1) == pytest.approx(0.4407, abs=1e-4)
    assert model_flops_utilization(flops, 450_000, 989e12, 2) == pytest.approx(0.2204, abs=1e-4)

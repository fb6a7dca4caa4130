"""The hot loop: no host syncs between log steps, yet the divergence rules of DESIGN.md hold;
MFU, TF32 and torch.compile settings."""

import dataclasses
import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from neoxlab import runtime as runtime_module
from neoxlab import trainer as trainer_module
from neoxlab.checkpoint import list_checkpoints
from neoxlab.config import load_config
from neoxlab.errors import NeoxlabError
from neoxlab.model import GPTNeoX
from neoxlab.runtime import Runtime, model_flops_utilization, resolve_runtime
from neoxlab.tracking import read_metrics
from neoxlab.trainer import Trainer

NEOXLAB_SOURCE = str(Path(trainer_module.__file__).parent)
# Python-level ways to read a tensor's value on the host (each waits for the GPU).
VALUE_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")


def make_trainer(overrides) -> Trainer:
    return Trainer(load_config([], overrides), progress=False, log=lambda _: None)


def test_train_step_never_reads_a_tensor_value(tiny_overrides, monkeypatch):
    """neoxlab's own code inside `_train_step` asks no tensor for its value (torch's CPU
    optimizer reading its CPU step counter is not a GPU sync and is not counted)."""
    trainer = make_trainer(
        [*tiny_overrides, "train-iters=6", "log-interval=3", "save=false", "sample-tokens=0"]
    )
    inside, reads = [False], []
    original_step = Trainer._train_step

    def watched_step(self, model):
        inside[0] = True
        try:
            return original_step(self, model)
        finally:
            inside[0] = False

    monkeypatch.setattr(Trainer, "_train_step", watched_step)

    def watched_read(name):
        original = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if inside[0] and caller.startswith(NEOXLAB_SOURCE):
                reads.append((name, caller))
            return original(self, *args, **kwargs)

        return read

    for name in VALUE_READS:
        monkeypatch.setattr(torch.Tensor, name, watched_read(name))
    trainer.run()
    assert reads == []
    assert trainer.step == 6


def poison_losses(monkeypatch, first_bad_call: int, value: float = float("nan")) -> None:
    """Training forward passes from call `first_bad_call` on return a non-finite loss."""
    original = GPTNeoX.forward
    calls = [0]

    def poisoned(self, *args, **kwargs):
        logits, loss = original(self, *args, **kwargs)
        if self.training:
            calls[0] += 1
            if calls[0] >= first_bad_call:
                loss = loss * value
        return logits, loss

    monkeypatch.setattr(GPTNeoX, "forward", poisoned)


def test_non_finite_loss_is_caught_before_the_next_checkpoint(tiny_overrides, monkeypatch):
    """Step 6 goes NaN between log steps; the save at step 8 checks first, so the run stops
    naming step 6 and the step-4 checkpoint is the last, with finite weights."""
    poison_losses(monkeypatch, first_bad_call=2 * 5 + 1)  # 2 micro-batches a step
    overrides = [*tiny_overrides, "train-iters=12", "log-interval=100", "eval-interval=100"]
    trainer = make_trainer([*overrides, "save-interval=4", "sample-tokens=0"])
    with pytest.raises(NeoxlabError, match=r"step 6: the loss became non-finite \(nan\).*step_0+4"):
        trainer.run()
    assert trainer.step == 8
    checkpoints = list_checkpoints(trainer.run_dir / "checkpoints")
    assert [c.name for c in checkpoints] == ["step_0000004"]
    weights = load_file(str(checkpoints[0] / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())


def test_non_finite_gradients_with_a_finite_loss_also_stop(tiny_overrides, monkeypatch):
    """A NaN gradient reaches the weights in the same step while that step's loss is finite."""
    calls = [0]
    original = trainer_module.clip_gradients

    def nan_at_step_3(parameters, config):
        parameters = list(parameters)
        calls[0] += 1
        if calls[0] == 3:
            parameters[0].grad.fill_(float("nan"))
        return original(parameters, config)

    monkeypatch.setattr(trainer_module, "clip_gradients", nan_at_step_3)
    trainer = make_trainer([*tiny_overrides, "log-interval=5", "sample-tokens=0"])
    with pytest.raises(NeoxlabError, match=r"step 3: the gradient norm became non-finite"):
        trainer.run()
    assert trainer.step == 5  # found at the next log step, before the step-10 checkpoint
    assert list_checkpoints(trainer.run_dir / "checkpoints") == []


def as_fp16(trainer: Trainer, initial_scale: float) -> Trainer:
    """fp16 with a GradScaler, on the CPU (resolve_runtime would pick fp32 there)."""
    trainer.runtime = dataclasses.replace(trainer.runtime, precision="fp16")
    trainer.scaler = torch.amp.GradScaler("cpu", init_scale=initial_scale)
    return trainer


def test_fp16_skipped_steps_are_counted_without_stopping(tiny_overrides, monkeypatch):
    poison_losses(monkeypatch, first_bad_call=2 * 6 + 1, value=float("inf"))
    overrides = [*tiny_overrides, "train-iters=8", "log-interval=4", "save=false"]
    trainer = as_fp16(make_trainer([*overrides, "sample-tokens=0"]), initial_scale=2.0**16)
    trainer.run()  # steps 7 and 8 overflow: skipped, counted, the run goes on
    logged = {
        m["step"]: m["train/skipped_steps"]
        for m in read_metrics(trainer.run_dir)
        if "train/loss" in m
    }
    assert logged == {1: 0, 4: 0, 8: 2}
    assert trainer.skipped_steps == 2
    assert trainer.scaler.get_scale() == 2.0**14  # halved once per skipped step


def test_fp16_scale_below_min_loss_scale_stops(tiny_overrides, monkeypatch):
    poison_losses(monkeypatch, first_bad_call=1, value=float("inf"))
    overrides = [*tiny_overrides, "log-interval=3", "fp16.min_loss_scale=64", "sample-tokens=0"]
    trainer = as_fp16(make_trainer(overrides), initial_scale=256.0)
    with pytest.raises(
        NeoxlabError, match=r"step 3: the fp16 loss scale fell below min-loss-scale"
    ):
        trainer.run()
    assert trainer.skipped_steps == 3


def test_mfu_divides_by_the_peak_of_every_device():
    assert model_flops_utilization(1e6, 2e5, 1e12, 1) == pytest.approx(0.2)
    assert model_flops_utilization(1e6, 8e5, 1e12, 4) == pytest.approx(0.2)  # 4 GPUs, 4x tokens


def test_logged_mfu_uses_the_papers_formula(tiny_overrides, monkeypatch):
    monkeypatch.setattr(Runtime, "peak_flops", lambda self: 1e9)
    trainer = make_trainer([*tiny_overrides, "train-iters=5", "save=false", "sample-tokens=0"])
    trainer.run()
    model = trainer.model
    # 6 x (parameters without the input embedding) + 12 x layers x hidden x context
    expected_flops = 6 * (model.num_parameters() - model.gpt_neox.embed_in.weight.numel())
    expected_flops += 12 * 2 * 32 * 32
    assert model.flops_per_token(32) == expected_flops
    for record in (m for m in read_metrics(trainer.run_dir) if "train/loss" in m):
        assert record["train/mfu"] == pytest.approx(
            expected_flops * record["train/tokens_per_second"] / 1e9
        )


def test_peak_table_matches_design():
    peaks = dict(runtime_module.PEAK_FLOPS)
    assert peaks == {"H200": 989e12, "H100": 989e12, "A100": 312e12, "T4": 65e12}


def test_cuda_runtime_turns_tf32_on(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        runtime = resolve_runtime("cuda", "auto", "auto", compile_mode="reduce-overhead")
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)
    assert (runtime.precision, runtime.compile, runtime.cuda_graphs) == ("bf16", True, True)


def test_cpu_runtime_lets_fp32_matmuls_use_bf16_arithmetic():
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        runtime = resolve_runtime("cpu", "auto", "auto")
        assert torch.get_float32_matmul_precision() == "medium"
    finally:
        torch.set_float32_matmul_precision(before)
    assert runtime.precision == "fp32"  # the model and its optimizer stay fp32
    # what the setting costs in accuracy (on a CPU without bf16 it is plain fp32)
    torch.manual_seed(0)
    a, b = torch.randn(64, 256), torch.randn(256, 64)
    exact = a.double() @ b.double()
    try:
        torch.set_float32_matmul_precision("medium")
        error = ((a @ b).double() - exact).abs().max().item()
    finally:
        torch.set_float32_matmul_precision(before)
    assert error < 1e-3  # bf16 inputs alone would be off by ~0.3


def test_compile_mode_reaches_torch_compile(tiny_overrides, monkeypatch):
    seen = []
    monkeypatch.setattr(torch, "compile", lambda model, **kwargs: seen.append(kwargs) or model)
    overrides = [*tiny_overrides, "compile=true", "compile-mode=max-autotune-no-cudagraphs"]
    trainer = make_trainer([*overrides, "train-iters=2", "save=false", "sample-tokens=0"])
    assert not trainer.runtime.cuda_graphs  # CUDA graphs only on CUDA
    trainer.run()
    assert seen == [{"mode": "max-autotune-no-cudagraphs"}]
    with pytest.raises(NeoxlabError, match="compile-mode must be one of"):
        load_config([], ["compile-mode=fast"])


def test_cuda_graphs_under_torchrun_are_refused(tiny_overrides, monkeypatch):
    monkeypatch.setattr(Runtime, "cuda_graphs", property(lambda self: True))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(NeoxlabError, match="one GPU only"):
        make_trainer([*tiny_overrides, "compile-mode=reduce-overhead"])


def test_health_read_resets_the_skip_count():
    health = trainer_module.StepHealth(torch.device("cpu"))
    health.record(1, torch.tensor(2.0), torch.tensor(float("inf")), fp16=True)
    health.record(2, torch.tensor(2.0), torch.tensor(1.0), fp16=True)
    assert health.read() == (-1, 0.0, 0.0, 1)
    assert health.read()[3] == 0
    health.record(3, torch.tensor(1.0), torch.tensor(1.0), fp16=False)
    health.record(4, torch.tensor(float("nan")), torch.tensor(1.0), fp16=False)
    health.record(5, torch.tensor(float("inf")), torch.tensor(2.0), fp16=False)
    first, loss, grad_norm, _ = health.read()
    assert first == 4 and math.isnan(loss) and grad_norm == 1.0  # the first bad step is kept

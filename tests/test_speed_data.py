"""Faster batch feeding gives exactly the batches (and so the losses) of the host samplers."""

import threading

import numpy as np
import pytest
import torch

from neoxlab import trainer as trainer_module
from neoxlab.config import load_config
from neoxlab.data import batches
from neoxlab.data.batches import (
    EVAL_STREAM,
    Batch,
    DeviceWindowSampler,
    PrefetchingSampler,
    WindowSampler,
    on_device,
)
from neoxlab.data.blend import BlendedWindowSampler, blend
from neoxlab.data.chat import PackedBatch
from neoxlab.tracking import read_metrics
from neoxlab.trainer import Trainer

CPU = torch.device("cpu")


def window_sampler(tokens: int = 5000, dtype=np.uint16) -> WindowSampler:
    stream = np.random.default_rng(0).integers(0, 60000, size=tokens).astype(dtype)
    return WindowSampler(stream, seq_length=32, seed=7, split="train")


@pytest.mark.parametrize("dtype", [np.uint16, np.int32])
def test_device_sampler_gives_the_host_batches(dtype):
    host = window_sampler(dtype=dtype)
    device = DeviceWindowSampler(host, CPU)
    for step, count, stream in [(0, 8, 0), (5, 3, 0), (5, 3, EVAL_STREAM), (123, 16, 0)]:
        expected, got = host.batch(step, count, stream), device.batch(step, count, stream)
        assert got.inputs.dtype == got.targets.dtype == torch.int64
        assert torch.equal(got.inputs, expected.inputs)
        assert torch.equal(got.targets, expected.targets)


class RecordingSampler:
    """A sampler that notes which (step, count, stream) it built, and on which thread."""

    def __init__(self) -> None:
        self.inner = window_sampler()
        self.calls: list[tuple[int, int, int]] = []
        self.threads: set[str] = set()

    def batch(self, step: int, count: int, stream: int = 0) -> Batch:
        self.calls.append((step, count, stream))
        self.threads.add(threading.current_thread().name)
        return self.inner.batch(step, count, stream)


def test_prefetching_builds_the_next_step_ahead_on_another_thread():
    recording = RecordingSampler()
    prefetching = PrefetchingSampler(recording, pin=False)
    first = prefetching.batch(0, 4)
    assert torch.equal(first.inputs, recording.inner.batch(0, 4).inputs)
    prefetching._ahead[1].result()  # wait for the background build of step 1
    assert (1, 4, 0) in recording.calls
    second = prefetching.batch(1, 4)
    assert recording.calls.count((1, 4, 0)) == 1  # served from the prefetch, not rebuilt
    assert torch.equal(second.inputs, recording.inner.batch(1, 4).inputs)
    assert any(name.startswith("neoxlab-batches") for name in recording.threads)
    # an unpredicted request (a resumed step) is built on the spot, and is still right
    jumped = prefetching.batch(9, 4)
    assert torch.equal(jumped.targets, recording.inner.batch(9, 4).targets)


def test_pin_memory_keeps_the_batch_type_and_every_tensor(monkeypatch):
    pinned = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda t: pinned.append(t) or t.clone())
    rows = [torch.arange(6).view(2, 3) + i for i in range(4)]
    packed = PackedBatch(*rows).pin_memory()
    assert type(packed) is PackedBatch and len(pinned) == 4
    assert torch.equal(packed.segment_ids, rows[3]) and packed.segment_ids is not rows[3]
    assert type(Batch(rows[0], rows[1]).pin_memory()) is Batch


def test_on_device_choices(monkeypatch):
    host = window_sampler()
    assert on_device(host, CPU) is host  # a CPU reads batches where they are
    built = []
    monkeypatch.setattr(batches, "DeviceWindowSampler", lambda s, d: built.append((s, d)) or s)
    cuda = torch.device("cuda")
    on_device(host, cuda)
    assert built == [(host, cuda)]  # a small plain corpus moves to the GPU
    monkeypatch.setattr(batches, "DEVICE_RESIDENT_MAX_TOKENS", 100)
    large = on_device(host, cuda)
    assert isinstance(large, PrefetchingSampler) and large.pin  # too large: pinned prefetch
    assert on_device(host, cuda, prefetch=False) is host
    mixed = BlendedWindowSampler(blend([host.tokens, host.tokens], [1, 1], ["a", "b"]), 32, 7, "t")
    assert isinstance(on_device(mixed, cuda), PrefetchingSampler)


def test_training_losses_are_the_same_with_device_and_prefetched_batches(
    tiny_overrides, monkeypatch
):
    """The trainer on the samplers a GPU gets (here on the CPU) trains exactly as on the host
    samplers: the same windows in the same order, so bit-identical losses."""
    overrides = [*tiny_overrides, "train-iters=6", "log-interval=1", "sample-tokens=0"]
    overrides += ["save=false", "eval-interval=3"]

    def run() -> tuple[Trainer, list[float]]:
        trainer = Trainer(load_config([], overrides), progress=False, log=lambda _: None)
        result = trainer.run()
        metrics = read_metrics(result.run_dir)
        return trainer, [m.get("train/loss", m.get("val/loss")) for m in metrics]

    host_trainer, host_losses = run()
    assert isinstance(host_trainer.train_sampler, WindowSampler)

    def gpu_like(sampler, device, prefetch=True):
        if isinstance(sampler, WindowSampler):
            return DeviceWindowSampler(sampler, device)
        return PrefetchingSampler(sampler, pin=False)

    monkeypatch.setattr(trainer_module, "on_device", gpu_like)
    device_trainer, device_losses = run()
    assert isinstance(device_trainer.train_sampler, DeviceWindowSampler)
    assert isinstance(device_trainer.val_sampler, DeviceWindowSampler)
    assert device_losses == host_losses

    monkeypatch.setattr(
        trainer_module, "on_device", lambda s, d, prefetch=True: PrefetchingSampler(s, pin=False)
    )
    prefetch_trainer, prefetch_losses = run()
    assert isinstance(prefetch_trainer.train_sampler, PrefetchingSampler)
    assert prefetch_losses == host_losses

"""Training runs timed for throughput: neoxlab's trainer measured by its own metrics.jsonl,
the overrides of such a run, and what a measurement holds (hf_baseline.py measures the
transformers baseline into the same `Throughput`)."""

from __future__ import annotations

import contextlib
import gc
import io
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import common
import torch

from neoxlab.config import Config
from neoxlab.data import batches
from neoxlab.model import ModelConfig
from neoxlab.runtime import Runtime, model_flops_utilization
from neoxlab.tracking import read_metrics
from neoxlab.trainer import Trainer


@dataclass
class Throughput:
    tokens_per_second: float
    mfu: float | None
    steps: int  # optimizer steps timed (after the warm-up)
    peak_memory_gib: float | None
    model: ModelConfig  # the network trained (for the baseline's shapes)
    global_batch: int
    precision: str


def timed_run_overrides(steps: int, log_every: int, smoke: bool) -> list[str]:
    """Overrides of a timed training run: no sample, no checkpoint, one evaluation batch."""
    return [
        f"train-iters={steps}",
        f"log-interval={log_every}",
        f"eval-interval={steps}",
        "eval-iters=1",
        "sample-tokens=0",
        "save=false",
        *(common.SMOKE_MODEL if smoke else []),
    ]


@contextlib.contextmanager
def device_resident(enabled: bool) -> Iterator[None]:
    """With `enabled` false, even small corpora stay on the host (the prefetched, pinned-memory
    path large corpora take), to measure what GPU-resident batches buy."""
    saved = batches.DEVICE_RESIDENT_MAX_TOKENS
    if not enabled:
        batches.DEVICE_RESIDENT_MAX_TOKENS = 0
    try:
        yield
    finally:
        batches.DEVICE_RESIDENT_MAX_TOKENS = saved


def train_neoxlab(config: Config, warmup_steps: int) -> Throughput:
    """Train with neoxlab's Trainer; tokens/s and MFU over the logged windows that start after
    `warmup_steps` (compilation and autotuning happen in the first steps). The trainer is
    released before returning, so the next run's peak memory is its own."""
    trainer = Trainer(config, progress=False, log=common.quiet)
    device = trainer.runtime.device
    reset_peak_memory(device)
    with contextlib.redirect_stdout(io.StringIO()):  # its evaluation lines
        trainer.run()
    timed = [w for w in windows(trainer.run_dir) if w[0] > warmup_steps]
    if not timed:
        raise SystemExit(f"no logged window starts after step {warmup_steps}: train longer")
    steps = sum(last - first + 1 for first, last, _ in timed)
    seconds = sum(s for *_, s in timed)
    tokens_per_second = steps * trainer.global_batch * config.seq_length / seconds
    flops = trainer.model.flops_per_token(config.seq_length)
    result = Throughput(
        tokens_per_second,
        mfu(trainer.runtime, flops, tokens_per_second),
        steps,
        peak_memory_gib(device),
        trainer.model.config,
        trainer.global_batch,
        trainer.runtime.precision,
    )
    del trainer
    release(device)
    return result


def windows(run_dir: Path) -> list[tuple[int, int, float]]:
    """(first step, last step, seconds) of each logged training window: the trainer's
    tokens/s covers the steps since the previous log, evaluation and checkpoints excluded."""
    result, previous_step, previous_tokens = [], 0, 0
    for metric in read_metrics(run_dir):
        if "train/tokens_per_second" not in metric:
            continue
        tokens = metric["tokens"] - previous_tokens
        result.append(
            (previous_step + 1, metric["step"], tokens / metric["train/tokens_per_second"])
        )
        previous_step, previous_tokens = metric["step"], metric["tokens"]
    return result


def mfu(runtime: Runtime, flops_per_token: int, tokens_per_second: float) -> float | None:
    peak = runtime.peak_flops()
    return model_flops_utilization(flops_per_token, tokens_per_second, peak, 1) if peak else None


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**30


def release(device: torch.device) -> None:
    """Free what the last run left (compiled graphs hold on to their modules until collected)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()

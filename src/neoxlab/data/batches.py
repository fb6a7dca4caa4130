"""Training batches: random windows of seq-length + 1 tokens from a split's token stream.

The windows of global step s come from one generator seeded by (seed, stream, s), so batches do
not depend on world size or on how many steps ran before: resuming needs only the step number.

On a GPU (`on_device`), a small corpus is copied to the device once and each step's windows are
gathered there (`DeviceWindowSampler`); any other sampler has its next batch built by a
background thread in pinned memory (`PrefetchingSampler`), so the copy to the GPU is
asynchronous and the host work overlaps the previous step. Both give exactly the batches of the
sampler they wrap.
"""

from __future__ import annotations

import dataclasses
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from neoxlab.errors import NeoxlabError

TRAIN_STREAM = 0
EVAL_STREAM = 1
IGNORE_INDEX = -100  # targets with this value add nothing to the loss
# Validation windows are drawn with this seed, not the run's: runs with different seeds are then
# scored on the same text (1234 is the default seed, so default runs keep their windows).
VALIDATION_SEED = 1234


@dataclass
class Batch:
    """Model inputs and next-token targets, shape (batch, seq); IGNORE_INDEX masks targets."""

    inputs: torch.Tensor
    targets: torch.Tensor

    def to(self, device: torch.device) -> Batch:
        return Batch(
            self.inputs.to(device, non_blocking=True), self.targets.to(device, non_blocking=True)
        )

    def rows(self, start: int, stop: int) -> Batch:
        return Batch(self.inputs[start:stop], self.targets[start:stop])

    def pin_memory(self) -> Batch:
        """The same batch in page-locked host memory, which the GPU can copy asynchronously."""
        pinned = {f.name: getattr(self, f.name).pin_memory() for f in dataclasses.fields(self)}
        return dataclasses.replace(self, **pinned)

    def model_kwargs(self) -> dict[str, torch.Tensor]:
        """Extra keyword arguments for the model's forward (none for plain windows)."""
        return {}


class Sampler(Protocol):
    """Anything that yields the batch of a step: the same (step, count, stream) -> same batch."""

    def batch(self, step: int, count: int, stream: int = TRAIN_STREAM) -> Batch: ...


class WindowSampler:
    """Samples (count, seq_length + 1) token windows; inputs are [:, :-1], targets [:, 1:]."""

    def __init__(self, tokens: np.ndarray, seq_length: int, seed: int, split: str) -> None:
        if len(tokens) < seq_length + 1:
            raise NeoxlabError(
                f"the {split} split has {len(tokens)} tokens, fewer than one sequence of "
                f"seq-length {seq_length} + 1",
                hint="use more data or a smaller seq-length",
            )
        self.tokens = tokens
        self.seq_length = seq_length
        self.seed = seed

    def starts(self, step: int, count: int, stream: int = TRAIN_STREAM) -> np.ndarray:
        """The first token of each of the step's windows."""
        rng = np.random.default_rng([self.seed, stream, step])
        return rng.integers(0, len(self.tokens) - self.seq_length, size=count)

    def windows(self, step: int, count: int, stream: int = TRAIN_STREAM) -> torch.Tensor:
        starts = self.starts(step, count, stream)
        span = self.seq_length + 1
        rows = np.stack([np.asarray(self.tokens[s : s + span]) for s in starts])
        return torch.from_numpy(rows.astype(np.int64))

    def batch(self, step: int, count: int, stream: int = TRAIN_STREAM) -> Batch:
        windows = self.windows(step, count, stream)
        return Batch(windows[:, :-1], windows[:, 1:])


class EodMaskedSampler:
    """gpt-neox's `eod-mask-loss`: the batches of `sampler` without loss where the input token
    is the end-of-document token, i.e. on the first token of the next document, which nothing in
    the window before it predicts (gpt-neox masks by input, not by target: the end-of-document
    token itself is still learned)."""

    def __init__(self, sampler: Sampler, eod_id: int) -> None:
        self.sampler = sampler
        self.eod_id = eod_id

    def batch(self, step: int, count: int, stream: int = TRAIN_STREAM) -> Batch:
        batch = self.sampler.batch(step, count, stream)
        targets = batch.targets.masked_fill(batch.inputs == self.eod_id, IGNORE_INDEX)
        return dataclasses.replace(batch, targets=targets)


# Splits up to this many tokens live on the GPU (as int32: 512 MiB at most). Tiny Shakespeare is
# 1M tokens, the Python standard library ~3M; C4-sized corpora stay on disk and stream.
DEVICE_RESIDENT_MAX_TOKENS = 1 << 27


class DeviceWindowSampler:
    """WindowSampler's windows, gathered on the device from a copy of the split held there.

    The window starts still come from the host generator seeded by (seed, stream, step), so the
    batches are exactly WindowSampler's (and world-size independent); only `count` integers
    cross to the device per step, instead of count x (seq-length + 1) tokens gathered by numpy.
    """

    def __init__(self, sampler: WindowSampler, device: torch.device) -> None:
        self.sampler = sampler
        self.device = device
        # int32 halves the copy of int64 and indexes any vocabulary; widened per batch below
        host_tokens = torch.from_numpy(np.asarray(sampler.tokens).astype(np.int32))
        self.tokens = host_tokens.to(device)
        self.offsets = torch.arange(sampler.seq_length + 1, device=device)

    def batch(self, step: int, count: int, stream: int = TRAIN_STREAM) -> Batch:
        starts = torch.from_numpy(self.sampler.starts(step, count, stream))
        if self.device.type == "cuda":
            starts = starts.pin_memory()  # so the copy below does not wait for the GPU
        starts = starts.to(self.device, non_blocking=True)
        windows = self.tokens[starts[:, None] + self.offsets].long()
        return Batch(windows[:, :-1], windows[:, 1:])


class PrefetchingSampler:
    """Any sampler, with the next step's batch built ahead by a background thread.

    Training asks for steps 0, 1, 2, ... with the same count, so after serving step s the thread
    starts on step s + 1 while the GPU runs step s. With `pin` the batch lands in pinned memory:
    `Batch.to(device)` then copies it without blocking the host. A request that was not
    predicted (another count or stream, a resumed step) is simply built on the spot.
    """

    def __init__(self, sampler: Sampler, pin: bool) -> None:
        self.sampler = sampler
        self.pin = pin
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="neoxlab-batches")
        self._ahead: tuple[tuple[int, int, int], Future[Batch]] | None = None

    def _build(self, step: int, count: int, stream: int) -> Batch:
        batch = self.sampler.batch(step, count, stream)
        return batch.pin_memory() if self.pin else batch

    def batch(self, step: int, count: int, stream: int = TRAIN_STREAM) -> Batch:
        key = (step, count, stream)
        if self._ahead is not None and self._ahead[0] == key:
            batch = self._ahead[1].result()
        else:
            batch = self._build(step, count, stream)
        self._ahead = (
            (step + 1, count, stream),
            self._executor.submit(self._build, step + 1, count, stream),
        )
        return batch


def on_device(sampler: Sampler, device: torch.device, prefetch: bool = True) -> Sampler:
    """The fastest way to feed `device` the batches of `sampler` (the same batches): small plain
    corpora move to the GPU; anything else is prefetched into pinned memory (`prefetch`); on a
    CPU batches are already where they are needed."""
    if device.type != "cuda":
        return sampler
    if isinstance(sampler, EodMaskedSampler):
        inner = on_device(sampler.sampler, device, prefetch=False)
        if inner is not sampler.sampler:  # its tokens moved to the GPU: mask there too
            return EodMaskedSampler(inner, sampler.eod_id)
    if isinstance(sampler, WindowSampler) and len(sampler.tokens) <= DEVICE_RESIDENT_MAX_TOKENS:
        return DeviceWindowSampler(sampler, device)
    return PrefetchingSampler(sampler, pin=True) if prefetch else sampler

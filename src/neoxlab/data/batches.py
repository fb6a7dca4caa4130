"""Training batches: random windows of seq-length + 1 tokens from a split's token stream.

The windows of global step s come from one generator seeded by (seed, stream, s), so batches do
not depend on world size or on how many steps ran before: resuming needs only the step number.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from neoxlab.errors import NeoxlabError

TRAIN_STREAM = 0
EVAL_STREAM = 1
IGNORE_INDEX = -100  # targets with this value add nothing to the loss


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

    def windows(self, step: int, count: int, stream: int = TRAIN_STREAM) -> torch.Tensor:
        rng = np.random.default_rng([self.seed, stream, step])
        starts = rng.integers(0, len(self.tokens) - self.seq_length, size=count)
        span = self.seq_length + 1
        rows = np.stack([np.asarray(self.tokens[s : s + span]) for s in starts])
        return torch.from_numpy(rows.astype(np.int64))

    def batch(self, step: int, count: int, stream: int = TRAIN_STREAM) -> Batch:
        windows = self.windows(step, count, stream)
        return Batch(windows[:, :-1], windows[:, 1:])

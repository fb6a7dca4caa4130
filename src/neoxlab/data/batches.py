"""Training batches: random windows of seq-length + 1 tokens from a split's token stream.

The windows of global step s come from one generator seeded by (seed, stream, s), so batches do
not depend on world size or on how many steps ran before: resuming needs only the step number.
"""

from __future__ import annotations

import numpy as np
import torch

from neoxlab.errors import NeoxlabError

TRAIN_STREAM = 0
EVAL_STREAM = 1


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

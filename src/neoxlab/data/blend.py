"""Weighted blends of prepared datasets: gpt-neox's `train-data-paths` + `train-data-weights`.

gpt-neox samples each dataset of a blend in proportion to its weight. Here every window of a
batch first picks its dataset with probability weight / sum(weights), then a random start inside
it; both draws come from the step's one generator, so a step's batch is the same at any world
size and a resumed run needs only the step number (as for a single dataset, see batches.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from neoxlab.data.batches import TRAIN_STREAM, Batch, WindowSampler
from neoxlab.errors import NeoxlabError


@dataclass
class Blend:
    """Several token streams of one split and how often each is sampled."""

    streams: list[np.ndarray]
    weights: list[float]  # normalised to sum to 1
    names: list[str]

    def __len__(self) -> int:
        return sum(len(stream) for stream in self.streams)


def blend(streams: list[np.ndarray], weights: list[float], names: list[str]) -> Blend:
    """Drop zero-weight datasets and normalise the rest."""
    kept = [(s, w, n) for s, w, n in zip(streams, weights, names, strict=True) if w > 0]
    total = sum(w for _, w, _ in kept)
    return Blend([s for s, _, _ in kept], [w / total for _, w, _ in kept], [n for *_, n in kept])


def weights_by_document_count(documents: list[int], alpha: float) -> list[float]:
    """gpt-neox's `weight-by-num-documents` weights for datasets of `documents` sequences each.

    Each dataset's share of all documents, p, is raised to `alpha` (below 1 lifts the small
    datasets, 0 evens them out) and renormalised; gpt-neox then multiplies by 1 - p and
    renormalises again. One dataset gets all the weight.
    """
    if len(documents) == 1:
        return [1.0]
    total = sum(documents)
    if total <= 0:
        raise NeoxlabError("weight-by-num-documents: the datasets hold no documents")
    shares = [count / total for count in documents]
    lifted = _normalised([share**alpha for share in shares])
    return _normalised([weight * (1 - share) for weight, share in zip(lifted, shares, strict=True)])


def _normalised(values: list[float]) -> list[float]:
    total = sum(values)
    return [value / total for value in values]


class BlendedWindowSampler:
    """Windows of seq-length + 1 tokens, each from a dataset drawn by weight."""

    def __init__(self, source: Blend, seq_length: int, seed: int, split: str) -> None:
        for tokens, name in zip(source.streams, source.names, strict=True):
            if len(tokens) < seq_length + 1:
                raise NeoxlabError(
                    f"{split} dataset {name} has {len(tokens)} tokens, fewer than one sequence "
                    f"of seq-length {seq_length} + 1",
                    hint="give it weight 0, remove it, or lower seq-length",
                )
        self.source = source
        self.seq_length = seq_length
        self.seed = seed

    def windows(self, step: int, count: int, stream: int = TRAIN_STREAM) -> torch.Tensor:
        rng = np.random.default_rng([self.seed, stream, step])
        streams = self.source.streams
        chosen = rng.choice(len(streams), size=count, p=self.source.weights)
        span = self.seq_length + 1
        rows = []
        for index in chosen:
            tokens = streams[index]
            start = int(rng.integers(0, len(tokens) - self.seq_length))
            rows.append(np.asarray(tokens[start : start + span]))
        return torch.from_numpy(np.stack(rows).astype(np.int64))

    def batch(self, step: int, count: int, stream: int = TRAIN_STREAM) -> Batch:
        windows = self.windows(step, count, stream)
        return Batch(windows[:, :-1], windows[:, 1:])


def make_sampler(
    source: np.ndarray | Blend, seq_length: int, seed: int, split: str
) -> WindowSampler | BlendedWindowSampler:
    """The sampler for one split's data: one token stream or a weighted blend."""
    if isinstance(source, Blend):
        return BlendedWindowSampler(source, seq_length, seed, split)
    return WindowSampler(source, seq_length, seed, split)

"""Validation metrics: loss, perplexity and next-token accuracy on fixed windows."""

from __future__ import annotations

import math

import torch
from torch import nn

from neoxlab.data.batches import EVAL_STREAM, WindowSampler
from neoxlab.runtime import Runtime


@torch.no_grad()
def evaluate(
    model: nn.Module, sampler: WindowSampler, iters: int, batch_size: int, runtime: Runtime
) -> dict[str, float]:
    """Mean token loss, perplexity and accuracy over `iters` batches.

    The windows are the same at every call (fixed stream and indices), so evaluations along a
    run, and across runs with the same data and seed, are comparable.
    """
    was_training = model.training
    model.eval()
    total_loss = torch.zeros((), dtype=torch.float64, device=runtime.device)
    correct = torch.zeros((), dtype=torch.int64, device=runtime.device)
    count = 0
    for index in range(iters):
        windows = sampler.windows(index, batch_size, stream=EVAL_STREAM).to(runtime.device)
        inputs, targets = windows[:, :-1], windows[:, 1:]
        with runtime.autocast():
            logits, loss = model(inputs, targets)
        total_loss += loss.double() * targets.numel()
        correct += (logits.argmax(dim=-1) == targets).sum()
        count += targets.numel()
    model.train(was_training)
    loss = total_loss.item() / count
    return {
        "loss": loss,
        "ppl": math.exp(min(loss, 700.0)),
        "acc": correct.item() / count,
    }

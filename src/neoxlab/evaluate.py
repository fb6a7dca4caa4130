"""Validation metrics: loss, perplexity and next-token accuracy on fixed windows."""

from __future__ import annotations

import math

import torch
from torch import nn

from neoxlab.data.batches import EVAL_STREAM, IGNORE_INDEX, Sampler
from neoxlab.runtime import Runtime


@torch.no_grad()
def evaluate(
    model: nn.Module, sampler: Sampler, iters: int, batch_size: int, runtime: Runtime
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
        batch = sampler.batch(index, batch_size, stream=EVAL_STREAM).to(runtime.device)
        with runtime.autocast():
            logits, loss = model(batch.inputs, batch.targets, **batch.model_kwargs())
        counted = batch.targets != IGNORE_INDEX
        tokens = int(counted.sum())
        total_loss += loss.double() * tokens
        correct += ((logits.argmax(dim=-1) == batch.targets) & counted).sum()
        count += tokens
    model.train(was_training)
    loss = total_loss.item() / count
    return {
        "loss": loss,
        "ppl": math.exp(min(loss, 700.0)),
        "acc": correct.item() / count,
    }

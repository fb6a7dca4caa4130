"""Optimizers and learning-rate schedules, built from config by name.

Adding an optimizer is one builder function and one line in OPTIMIZERS; adding a schedule is one
function of the decay progress and one line in SCHEDULES.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from neoxlab.config import Config
from neoxlab.errors import NeoxlabError


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on every >= 2-D weight (embeddings and head included, as gpt-neox does);
    never on norms and biases."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (decay if parameter.dim() >= 2 else no_decay).append(parameter)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def _adamw(groups: list[dict], lr: float, params: dict, fused: bool) -> torch.optim.Optimizer:
    # gpt-neox's fused Adam decouples weight decay, so "Adam" with decay is AdamW behaviour.
    return torch.optim.AdamW(groups, lr=lr, fused=fused or None, **params)


def _sgd(groups: list[dict], lr: float, params: dict, fused: bool) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=lr, **params)


OPTIMIZERS: dict[str, Callable[[list[dict], float, dict, bool], torch.optim.Optimizer]] = {
    "Adam": _adamw,
    "AdamW": _adamw,
    "SGD": _sgd,
}


def build_optimizer(model: nn.Module, config: Config) -> torch.optim.Optimizer:
    name = config.optimizer["type"]
    params = dict(config.optimizer.get("params") or {})
    if "betas" in params:
        params["betas"] = tuple(float(b) for b in params["betas"])
    fused = next(model.parameters()).is_cuda and name in ("Adam", "AdamW")
    groups = parameter_groups(model, config.weight_decay)
    try:
        return OPTIMIZERS[name](groups, config.lr, params, fused)
    except (TypeError, ValueError) as err:
        raise NeoxlabError(
            f"optimizer {name} rejected optimizer.params {params}: {err}",
            hint="check the option names and values for this optimizer",
        ) from None


def _constant(progress: float) -> float:
    return 1.0


def _linear(progress: float) -> float:
    return 1.0 - progress


def _cosine(progress: float) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * progress))


# Each maps decay progress in [0, 1] to a factor in [0, 1] between min-lr and lr.
SCHEDULES: dict[str, Callable[[float], float]] = {
    "constant": _constant,
    "linear": _linear,
    "cosine": _cosine,
}


def lr_at(step: int, config: Config) -> float:
    """Learning rate for optimizer step `step` (0-based): warmup, then decay to min-lr."""
    warmup = config.warmup_iters()
    if step < warmup:
        return config.lr * (step + 1) / warmup
    decay_iters = config.lr_decay_iters or config.train_iters
    if decay_iters <= warmup:
        return config.min_lr
    progress = min(1.0, (step - warmup) / (decay_iters - warmup))
    factor = SCHEDULES[config.lr_decay_style](progress)
    return config.min_lr + (config.lr - config.min_lr) * factor

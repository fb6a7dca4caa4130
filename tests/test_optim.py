"""Optimizers and schedules built from config."""

import math

import pytest
import torch

from neoxlab.config import Config
from neoxlab.errors import NeoxlabError
from neoxlab.optim import build_optimizer, lr_at, parameter_groups


def tiny_model() -> torch.nn.Module:
    return torch.nn.Sequential(
        torch.nn.Embedding(10, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 10)
    )


def test_weight_decay_only_on_matrices():
    model = tiny_model()
    decay, no_decay = parameter_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and len(decay["params"]) == 2
    assert all(p.dim() == 1 for p in no_decay["params"]) and len(no_decay["params"]) == 3


@pytest.mark.parametrize("name", ["Adam", "AdamW", "SGD"])
def test_optimizers_build_and_take_params(name):
    params = {"momentum": 0.9, "nesterov": True} if name == "SGD" else {"betas": [0.9, 0.95]}
    config = Config(optimizer={"type": name, "params": params}, lr=0.01, weight_decay=0.1)
    optimizer = build_optimizer(tiny_model(), config)
    assert optimizer.param_groups[0]["lr"] == 0.01
    assert optimizer.param_groups[0]["weight_decay"] == 0.1
    assert optimizer.param_groups[1]["weight_decay"] == 0.0


def test_adam_with_decay_is_decoupled():
    optimizer = build_optimizer(tiny_model(), Config(optimizer={"type": "Adam", "params": {}}))
    assert isinstance(optimizer, torch.optim.AdamW)


def test_unknown_optimizer_param_is_clear():
    config = Config(optimizer={"type": "Adam", "params": {"momentum": 0.9}})
    with pytest.raises(NeoxlabError, match=r"optimizer.params"):
        build_optimizer(tiny_model(), config)


def test_cosine_schedule_with_fractional_warmup():
    config = Config(lr=1.0, min_lr=0.1, train_iters=100, warmup=0.1, lr_decay_style="cosine")
    assert lr_at(0, config) == pytest.approx(0.1)
    assert lr_at(9, config) == pytest.approx(1.0)
    assert lr_at(10, config) == pytest.approx(1.0)
    assert lr_at(55, config) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(100, config) == pytest.approx(0.1)
    assert lr_at(500, config) == pytest.approx(0.1)


def test_linear_and_constant_schedules():
    linear = Config(lr=1.0, min_lr=0.0, train_iters=10, warmup=0, lr_decay_style="linear")
    assert [round(lr_at(s, linear), 3) for s in (0, 5, 10)] == [1.0, 0.5, 0.0]
    constant = Config(lr=0.5, train_iters=10, warmup=2, lr_decay_style="constant")
    assert [lr_at(s, constant) for s in (0, 1, 2, 9)] == [0.25, 0.5, 0.5, 0.5]

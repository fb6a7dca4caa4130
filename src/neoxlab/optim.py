"""Optimizers, learning-rate schedules and gradient clipping, built from config by name.

Adding an optimizer is one builder function and one line in OPTIMIZERS; adding a schedule is one
function and one line in SCHEDULES. config.py validates `optimizer.type` and `lr-decay-style`
against these registries, so this module must not import config: what it reads from a config is
spelled out as the `Hyperparameters` protocol below, which config.Config satisfies.

torch.optim supplies AdamW, SGD, Adafactor and Muon; bitsandbytes (the optional `finetune` extra)
AdamW8bit; only Lion is written here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from neoxlab.adapters import import_quietly
from neoxlab.errors import NeoxlabError

# Muon's learning rate from Keller Jordan's write-up (torch.optim.Muon defaults to 1e-3; its
# defaults momentum 0.95, Nesterov and 5 Newton-Schulz steps are the write-up's too).
MUON_LR = 0.02
# optimizer.params keys that configure Muon itself; every other key goes to its AdamW companion.
MUON_OPTIONS = ("momentum", "nesterov", "ns_steps", "ns_coefficients", "adjust_lr_fn")


class Hyperparameters(Protocol):
    """The config values optimizers, clipping and schedules read (config.Config has them all)."""

    optimizer: dict
    lr: float
    min_lr: float
    lr_decay_style: str
    lr_decay_iters: int | None
    train_iters: int
    wsd_decay_fraction: float
    weight_decay: float
    weight_decay_embeddings: bool
    gradient_clipping: float
    gradient_clipping_type: str

    def warmup_iters(self) -> int: ...


# ---- parameter groups --------------------------------------------------------------------------


def parameter_groups(
    model: nn.Module,
    weight_decay: float,
    decay_embeddings: bool = True,
    exclude: Iterable[nn.Parameter] = (),
) -> list[dict[str, Any]]:
    """[decay group, no-decay group]: weight decay on every >= 2-D weight (embeddings and the
    output head included, as gpt-neox does), never on norms and biases. `decay_embeddings=False`
    takes nn.Embedding weights out of decay; `exclude` leaves parameters out of both groups."""
    skipped = {id(p) for p in exclude}
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for parameter in model.parameters():
        if not parameter.requires_grad or id(parameter) in skipped:
            continue
        decayed = parameter.dim() >= 2 and (decay_embeddings or id(parameter) not in embeddings)
        (decay if decayed else no_decay).append(parameter)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def block_matrices(model: nn.Module) -> list[nn.Parameter]:
    """The 2-D weights inside the repeated transformer blocks (any nn.ModuleList): the matrices
    Muon orthogonalises. Embeddings, the output head, norms and biases are not among them."""
    found: dict[int, nn.Parameter] = {}
    for module in model.modules():
        if isinstance(module, nn.ModuleList):
            for parameter in module.parameters():
                if parameter.dim() == 2 and parameter.requires_grad:
                    found[id(parameter)] = parameter
    return list(found.values())


# ---- optimizers --------------------------------------------------------------------------------


# Devices where torch's fused AdamW runs: one kernel per parameter instead of a dozen. On a CPU
# the default (a loop of element-wise ops per parameter) took 50 ms per step for 5.8M
# parameters where the fused kernel took 3 ms (bench/RESULTS.md, "CPU").
FUSED_ADAMW_DEVICES = ("cpu", "cuda")


def _fused_adamw(model: nn.Module) -> bool | None:
    """True where the fused kernel runs; None (torch's own choice) elsewhere."""
    return next(model.parameters()).device.type in FUSED_ADAMW_DEVICES or None


def _adamw(model: nn.Module, config: Hyperparameters, params: dict) -> torch.optim.Optimizer:
    # gpt-neox's fused Adam decouples weight decay, so "Adam" with decay is AdamW behaviour.
    groups = parameter_groups(model, config.weight_decay, config.weight_decay_embeddings)
    return torch.optim.AdamW(groups, lr=config.lr, fused=_fused_adamw(model), **params)


def _adamw8bit(model: nn.Module, config: Hyperparameters, params: dict) -> torch.optim.Optimizer:
    """AdamW with both moments in 8 bits (bitsandbytes; Dettmers et al. 2022): block-wise
    quantized, 2 bytes per weight instead of 8, same update. It has CPU and CUDA kernels; its
    state is plain tensors, so checkpoints resume it exactly. Tensors under 4,096 elements keep
    32-bit moments (bitsandbytes' min_8bit_size)."""
    if any(isinstance(p, DTensor) for p in model.parameters()):
        raise NeoxlabError(
            "AdamW8bit (bitsandbytes) cannot update FSDP's sharded parameters (zero stage >= 1, "
            "distributed: fsdp, or offload_optimizer)",
            hint="use AdamW there, or AdamW8bit with distributed=ddp and no offload",
        )
    bnb = import_quietly("bitsandbytes", "optimizer AdamW8bit")
    groups = parameter_groups(model, config.weight_decay, config.weight_decay_embeddings)
    return bnb.optim.AdamW8bit(groups, lr=config.lr, **params)


def _sgd(model: nn.Module, config: Hyperparameters, params: dict) -> torch.optim.Optimizer:
    # torch's SGD adds weight decay to the gradient (L2), as classic SGD does.
    groups = parameter_groups(model, config.weight_decay, config.weight_decay_embeddings)
    return torch.optim.SGD(groups, lr=config.lr, **params)


def _adafactor(model: nn.Module, config: Hyperparameters, params: dict) -> torch.optim.Optimizer:
    groups = parameter_groups(model, config.weight_decay, config.weight_decay_embeddings)
    return torch.optim.Adafactor(groups, lr=config.lr, **params)


def _lion(model: nn.Module, config: Hyperparameters, params: dict) -> torch.optim.Optimizer:
    groups = parameter_groups(model, config.weight_decay, config.weight_decay_embeddings)
    return Lion(groups, lr=config.lr, **params)


def _muon(model: nn.Module, config: Hyperparameters, params: dict) -> MuonWithAdamW:
    """Muon (lr `optimizer.params.muon_lr`, default 0.02) for the block matrices; AdamW at `lr`
    for embeddings, output head, norms and biases. Both follow the one schedule: the Muon group
    stores `lr_scale` = muon_lr / lr, which `set_lr` applies at every step."""
    if config.lr <= 0:
        raise NeoxlabError("Muon needs lr > 0", hint="lr is the AdamW rate; Muon's is muon_lr")
    muon_lr = float(params.pop("muon_lr", MUON_LR))
    muon_options = {key: params.pop(key) for key in MUON_OPTIONS if key in params}
    matrices = block_matrices(model)
    muon = torch.optim.Muon(
        [{"params": matrices, "lr_scale": muon_lr / config.lr}],
        lr=muon_lr,
        weight_decay=config.weight_decay,
        **muon_options,
    )
    groups = parameter_groups(
        model, config.weight_decay, config.weight_decay_embeddings, exclude=matrices
    )
    adamw = torch.optim.AdamW(groups, lr=config.lr, fused=_fused_adamw(model), **params)
    return MuonWithAdamW(muon, adamw)


OptimizerBuilder = Callable[[nn.Module, Hyperparameters, dict], Any]

OPTIMIZERS: dict[str, OptimizerBuilder] = {
    "Adam": _adamw,
    "AdamW": _adamw,
    "SGD": _sgd,
    "Lion": _lion,
    "Adafactor": _adafactor,
    "Muon": _muon,
    "AdamW8bit": _adamw8bit,
}


def build_optimizer(
    model: nn.Module, config: Hyperparameters
) -> torch.optim.Optimizer | MuonWithAdamW:
    name = config.optimizer["type"]
    params = dict(config.optimizer.get("params") or {})
    try:
        for key in ("betas", "ns_coefficients"):  # YAML gives lists; torch expects tuples
            if key in params:
                params[key] = tuple(float(b) for b in params[key])
        return OPTIMIZERS[name](model, config, params)
    except (TypeError, ValueError) as err:
        raise NeoxlabError(
            f"optimizer {name} rejected optimizer.params {config.optimizer.get('params')}: {err}",
            hint="check the option names and values for this optimizer",
        ) from None


class Lion(torch.optim.Optimizer):
    """Lion (Chen et al. 2023, "Symbolic Discovery of Optimization Algorithms").

    The update is the sign of an interpolation between momentum and gradient, so every weight
    moves by exactly lr per step; the momentum is then updated with a second, slower beta. One
    state tensor per weight (Adam keeps two). Weight decay is decoupled, as in AdamW. Because the
    sign makes updates larger than Adam's, Lion wants a 3-10x smaller lr and a 3-10x larger
    weight decay than AdamW.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
    ) -> None:
        if lr < 0 or weight_decay < 0:
            raise ValueError(f"lr and weight_decay must be >= 0, got {lr} and {weight_decay}")
        if len(betas) != 2 or not all(0 <= b < 1 for b in betas):
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas}")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2) = group["lr"], group["betas"]
            for param in group["params"]:
                if param.grad is None:
                    continue
                state = self.state[param]
                if not state:
                    state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
                momentum = state["exp_avg"]
                param.mul_(1 - lr * group["weight_decay"])
                param.add_(momentum.lerp(param.grad, 1 - beta1).sign_(), alpha=-lr)
                momentum.lerp_(param.grad, 1 - beta2)
        return loss


class MuonWithAdamW:
    """torch.optim.Muon and its AdamW companion behind one optimizer interface: `param_groups`
    (both lists, so the LR schedule and GradScaler see every parameter), `step`, `zero_grad`,
    and a `state_dict` of plain tensors and numbers that `load_state_dict` restores exactly."""

    def __init__(self, muon: torch.optim.Muon, adamw: torch.optim.AdamW) -> None:
        self.muon = muon
        self.adamw = adamw

    @property
    def optimizers(self) -> tuple[torch.optim.Optimizer, torch.optim.Optimizer]:
        return self.muon, self.adamw

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [*self.muon.param_groups, *self.adamw.param_groups]

    def step(self) -> None:
        for optimizer in self.optimizers:
            optimizer.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != {"muon", "adamw"}:
            raise NeoxlabError(
                "the checkpoint's optimizer state is not Muon's (muon + adamw)",
                hint="resume with the optimizer the run was trained with",
            )
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])


def set_lr(optimizer: torch.optim.Optimizer | MuonWithAdamW, lr: float) -> None:
    """Set this step's lr on every group, times the group's `lr_scale` (Muon's own rate)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


# ---- gradient clipping -------------------------------------------------------------------------


def clip_gradients(parameters: Iterable[nn.Parameter], config: Hyperparameters) -> torch.Tensor:
    """Clip gradients in place by global norm or element value (`gradient-clipping-type`) to
    `gradient-clipping` (0 = off); return the global gradient norm before clipping."""
    parameters = list(parameters)
    limit = config.gradient_clipping
    if config.gradient_clipping_type == "norm":
        return torch.nn.utils.clip_grad_norm_(parameters, limit or math.inf)
    norm = torch.nn.utils.get_total_norm([p.grad for p in parameters if p.grad is not None])
    if limit:
        torch.nn.utils.clip_grad_value_(parameters, limit)
    return norm


# ---- learning-rate schedules -------------------------------------------------------------------
# Each maps an optimizer step at or after warmup to its learning rate; `lr_at` adds the warmup.


def _decay_iters(config: Hyperparameters) -> int:
    return config.lr_decay_iters or config.train_iters


def _decay_progress(step: int, start: int, end: int) -> float:
    """Where `step` lies between `start` and `end`, clamped to [0, 1] (1 when end <= start)."""
    if end <= start:
        return 1.0
    return min(1.0, max(0.0, (step - start) / (end - start)))


def _towards_min(config: Hyperparameters, factor: float) -> float:
    """factor 1 -> lr, 0 -> min-lr."""
    return config.min_lr + (config.lr - config.min_lr) * factor


def _constant(step: int, config: Hyperparameters) -> float:
    return config.lr


def _linear(step: int, config: Hyperparameters) -> float:
    progress = _decay_progress(step, config.warmup_iters(), _decay_iters(config))
    return _towards_min(config, 1.0 - progress)


def _cosine(step: int, config: Hyperparameters) -> float:
    progress = _decay_progress(step, config.warmup_iters(), _decay_iters(config))
    return _towards_min(config, 0.5 * (1.0 + math.cos(math.pi * progress)))


def _warmup_stable_decay(step: int, config: Hyperparameters) -> float:
    """Hold lr, then decay linearly to min-lr over the last `wsd-decay-fraction` of
    lr-decay-iters (Hägele et al. 2024: a linear cooldown matches cosine at the end, and the
    stable phase's checkpoints can be cooled down later for any training length)."""
    end = _decay_iters(config)
    start = max(config.warmup_iters(), end - round(config.wsd_decay_fraction * end))
    return _towards_min(config, 1.0 - _decay_progress(step, start, end))


def _inverse_sqrt(step: int, config: Hyperparameters) -> float:
    """lr * sqrt(warmup / step) after warmup, never below min-lr; it has no end, so it ignores
    lr-decay-iters (handy for runs whose length is not known in advance)."""
    warmup = max(config.warmup_iters(), 1)
    return max(config.min_lr, config.lr * math.sqrt(warmup / max(step, warmup)))


SCHEDULES: dict[str, Callable[[int, Hyperparameters], float]] = {
    "constant": _constant,
    "linear": _linear,
    "cosine": _cosine,
    "wsd": _warmup_stable_decay,
    "inverse_sqrt": _inverse_sqrt,
}


def lr_at(step: int, config: Hyperparameters) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup to lr, then the
    schedule named by lr-decay-style."""
    warmup = config.warmup_iters()
    if step < warmup:
        return config.lr * (step + 1) / warmup
    return SCHEDULES[config.lr_decay_style](step, config)

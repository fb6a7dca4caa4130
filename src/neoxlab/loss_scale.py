"""fp16 loss scaling as DeepSpeed (gpt-neox's engine) does it, on top of torch's GradScaler.

torch's GradScaler halves the scale at every step whose gradients overflow. DeepSpeed waits:
with `hysteresis` h, an overflow only skips its step until h - 1 of them have come since the
scale last grew; the next one halves it (with `consecutive_hysteresis`, any clean step refills
the count instead). A static loss scale (`fp16.loss_scale` > 0) never changes at all. Both
GradScalers skip the overflowed step and restart the growth window, as DeepSpeed does. The count
lives on the device beside the scale, so no training step waits for the GPU.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

NEVER = 2**31 - 1  # growth interval of a static scale


class _DelayedBackoff:
    """Mixed into a GradScaler: `update` keeps the scale on the overflows hysteresis absorbs."""

    _enabled: bool
    _scale: torch.Tensor | None

    def _init_backoff(self, hysteresis: int, consecutive: bool, static: bool) -> None:
        self.hysteresis = hysteresis
        self.consecutive = consecutive
        self.static = static
        self._left: torch.Tensor | None = None  # overflows still absorbed, on the scale's device
        self._loaded_left = hysteresis

    def update(self, new_scale: float | torch.Tensor | None = None) -> None:
        plain = self.hysteresis == 1 and not self.static
        if new_scale is not None or not self._enabled or plain or self._scale is None:
            super().update(new_scale)  # type: ignore[misc]
            return
        before = self._scale.clone()
        super().update()  # type: ignore[misc]
        after = self._scale
        if self._left is None:
            self._left = torch.full((), self._loaded_left, dtype=torch.int32, device=after.device)
        overflowed = after < before  # GradScaler backs off exactly on overflow
        hold = overflowed if self.static else overflowed & (self._left > 1)
        after.copy_(torch.where(hold, before, after))
        refill = ~overflowed if self.consecutive else after > before
        full = torch.full_like(self._left, self.hysteresis)
        self._left = torch.where(hold, self._left - 1, torch.where(refill, full, self._left))

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()  # type: ignore[misc]
        if state:
            left = self._left
            state["hysteresis_left"] = int(left) if left is not None else self._loaded_left
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = {k: v for k, v in state_dict.items() if k != "hysteresis_left"}
        super().load_state_dict(saved)  # type: ignore[misc]
        self._loaded_left = int(state_dict.get("hysteresis_left", self.hysteresis))
        self._left = None


class DelayedBackoffGradScaler(_DelayedBackoff, torch.amp.GradScaler):
    """torch's GradScaler with DeepSpeed's delayed backoff and static scale."""


class ShardedDelayedBackoffGradScaler(_DelayedBackoff, ShardedGradScaler):
    """The same for FSDP2, whose ranks must agree on overflows of their gradient shards."""


def build_grad_scaler(
    device_type: str, enabled: bool, fp16: dict[str, Any], sharded: bool = False
) -> torch.amp.GradScaler:
    """The loss scaler of a config's fp16 block ({loss_scale, initial_scale_power,
    loss_scale_window, hysteresis, consecutive_hysteresis}); disabled unless `enabled`."""
    static = fp16["loss_scale"] > 0
    scaler_class = ShardedDelayedBackoffGradScaler if sharded else DelayedBackoffGradScaler
    scaler = scaler_class(
        device_type,
        enabled=enabled,
        init_scale=fp16["loss_scale"] if static else 2.0 ** fp16["initial_scale_power"],
        growth_interval=NEVER if static else fp16["loss_scale_window"],
    )
    scaler._init_backoff(fp16["hysteresis"], fp16["consecutive_hysteresis"], static)
    return scaler

"""Which learning-rate schedule a resumed run follows when its config's differs from the
checkpoint's: gpt-neox's `override-lr-scheduler` and `use-checkpoint-lr-scheduler`.

gpt-neox compares the checkpoint's schedule (peak lr, min-lr, warmup steps, the step decay ends
at, decay style) with the config's: `use-checkpoint-lr-scheduler` continues with the checkpoint's,
`override-lr-scheduler` with the config's, and neither stops the run. neoxlab continues with the
config's in that last case too, with a notice naming what changed (a run's schedule is a function
of its config and the step; DESIGN: changing train-iters on resume prints a notice).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from neoxlab.config import Config, config_from_dict


@dataclasses.dataclass(frozen=True)
class Schedule:
    """What decides the learning rate of every step."""

    lr: float
    min_lr: float
    warmup_iters: int
    decay_iters: int  # the step the decay ends at
    lr_decay_style: str
    wsd_decay_fraction: float

    @classmethod
    def of(cls, config: Config) -> Schedule:
        return cls(
            config.lr,
            config.min_lr,
            config.warmup_iters(),
            config.lr_decay_iters or config.train_iters,
            config.lr_decay_style,
            config.wsd_decay_fraction,
        )

    def differences(self, other: Schedule) -> list[str]:
        """'name old -> new' for each value `other` changes."""
        return [
            f"{f.name.replace('_', '-')} {getattr(self, f.name)} -> {getattr(other, f.name)}"
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != getattr(other, f.name)
        ]


def schedule_on_resume(
    config: Config, saved_config: dict[str, Any], log: Callable[[str], None]
) -> Config:
    """The config to continue with, given the checkpoint's config (its state.json copy)."""
    checkpoint = Schedule.of(config_from_dict(saved_config))
    changes = checkpoint.differences(Schedule.of(config))
    if not changes:
        return config
    if config.use_checkpoint_lr_scheduler:
        log(
            f"use-checkpoint-lr-scheduler: keeping the checkpoint's schedule ({', '.join(changes)})"
        )
        return dataclasses.replace(
            config,
            lr=checkpoint.lr,
            min_lr=checkpoint.min_lr,
            warmup=float(checkpoint.warmup_iters),  # >= 1: steps; 0: none
            lr_decay_iters=checkpoint.decay_iters,
            lr_decay_style=checkpoint.lr_decay_style,
            wsd_decay_fraction=checkpoint.wsd_decay_fraction,
        )
    if not config.override_lr_scheduler:
        log(
            f"note: the lr schedule differs from the checkpoint's ({', '.join(changes)}): "
            "continuing with this config's (gpt-neox stops here unless override-lr-scheduler or "
            "use-checkpoint-lr-scheduler is set)"
        )
    return config

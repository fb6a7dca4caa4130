"""Ctrl-C and SIGTERM (Slurm preemption, `kill`) during training: finish the step, save a
checkpoint, stop. A second signal stops at once (KeyboardInterrupt).

Every rank of a torchrun job gets the signal, but not at the same instant: ranks that stopped at
different steps would hang in the next collective. So in a distributed run the ranks vote: each
step all-reduces (max) the signal each rank has seen, and every rank reads that vote one step
later, when waiting for it does not drain the GPU's queue of the current step; they all stop at
the same step, one step after the signal.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

import torch

from neoxlab import distributed

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopOnSignal:
    """Installed around the training loop (`install()`, then `restore()`); `requested()` after
    each step says whether to checkpoint and stop: the signal number (the same on every rank),
    else 0."""

    def __init__(
        self, world: distributed.World, device: torch.device, log: Callable[[str], None]
    ) -> None:
        self.world = world
        self.device = device
        self.log = log
        self.received = 0
        # the vote of the previous step: its value on the host and the event of its arrival
        self._pending: tuple[torch.Tensor, torch.cuda.Event | None] | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> StopOnSignal:
        # Python delivers signals to the main thread only; elsewhere (a training thread of a
        # host application) the host's own handling stays.
        if threading.current_thread() is threading.main_thread():
            for number in SIGNALS:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def restore(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def _handle(self, number: int, frame: FrameType | None) -> None:
        if self.received:
            raise KeyboardInterrupt  # asked twice: stop now, without a checkpoint
        self.received = number
        # Under torchrun the message waits for the ranks' vote: torchrun also sends SIGTERM to
        # the ranks that survive a failed one, whose next collective then fails (the trainer
        # says so), and no step or checkpoint follows.
        if not self.world.distributed:
            self._announce(number)

    def _announce(self, number: int) -> None:
        self.log(
            f"\n{signal.Signals(number).name} received: stopping after this step with a "
            "checkpoint (send it again to stop at once)"
        )

    def requested(self) -> int:
        if not self.world.distributed:
            return self.received
        agreed = 0
        if self._pending is not None:
            vote, arrived = self._pending
            if arrived is not None:
                arrived.synchronize()  # last step's vote: in flight behind last step's work only
            agreed = int(vote)
            if agreed:
                self._announce(agreed)
        flag = torch.full((), self.received, dtype=torch.int32, device=self.device)
        vote = distributed.max_across_ranks(flag, self.world).to("cpu", non_blocking=True)
        arrived = None
        if self.device.type == "cuda":
            arrived = torch.cuda.Event()
            arrived.record()
        self._pending = (vote, arrived)
        return agreed

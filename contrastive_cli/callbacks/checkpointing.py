"""checkpoints/last.pt: after every epoch (``trainer.checkpoint``) and on a stop request.

The checkpoint holds the config as the run records it (``ConfigRecord``: after a time
budget, with the epoch count it fixed) and its training digest, which ``resume`` checks."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from contrastive_cli.checkpoint import save_checkpoint
from contrastive_cli.events import Callback, Loop


class Recorded(Protocol):
    """The run's recorded config (``contrastive_cli.record.ConfigRecord``)."""

    resolved: dict[str, Any]
    digest: str
    starting: dict[str, Any] | None


class Checkpointing(Callback):
    """``every_epoch``: save at epochs' ends, at most every ``every_s`` seconds (a cadence
    bounds the bytes written: a 100-epoch digits run rewrote 7 MB 100 times), and after the
    last epoch always; a stop request saves on its own. ``wall_time``: the run's wall time
    so far, earlier attempts included."""

    def __init__(
        self,
        path: Callable[[], Path],
        config: Recorded,
        every_epoch: bool,
        wall_time: Callable[[], float] = lambda: 0.0,
        every_s: float = 0.0,
    ):
        self.path, self.config, self.every_epoch = path, config, every_epoch
        self.wall_time, self.every_s = wall_time, every_s
        self.last_save = time.monotonic()  # the start counts

    def epoch_end(self, loop: Loop, record: dict[str, Any]) -> None:
        if self.every_epoch and (
            loop.progress.epoch >= loop.epochs or time.monotonic() - self.last_save >= self.every_s
        ):
            self.save(loop)

    def stop_requested(self, loop: Loop) -> None:
        self.save(loop)

    def save(self, loop: Loop) -> None:
        save_checkpoint(
            self.path(),
            {
                "method": loop.method.state_dict(),
                "optimizer": loop.optimizer.state_dict(),
                "scheduler": loop.scheduler.state_dict(),
                "progress": dataclasses.asdict(loop.progress),
                "config": self.config.resolved,
                "config_digest": self.config.digest,
                "wall_time_s": self.wall_time(),  # this attempt and the earlier ones
                **({"starting_weights": self.config.starting} if self.config.starting else {}),
            },
        )
        self.last_save = time.monotonic()

"""checkpoints/last.pt: after every epoch (``trainer.checkpoint``) and on a stop request.

The checkpoint holds the config as the run records it (``ConfigRecord``: after a time
budget, with the epoch count it fixed) and its training digest, which ``resume`` checks."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from contrastive_cli.checkpoint import save_checkpoint
from contrastive_cli.events import Callback, Loop


class Recorded(Protocol):
    """The run's recorded config (``contrastive_cli.record.ConfigRecord``)."""

    resolved: dict[str, Any]
    digest: str


class Checkpointing(Callback):
    def __init__(self, path: Callable[[], Path], config: Recorded, every_epoch: bool):
        self.path, self.config, self.every_epoch = path, config, every_epoch

    def epoch_end(self, loop: Loop, record: dict[str, Any]) -> None:
        if self.every_epoch:
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
            },
        )

"""MLflow and TensorBoard during training: the step's loss and lr every ``log_every`` steps,
the epoch's record at its end (rank 0's trackers; a call never blocks the loop)."""

from __future__ import annotations

from typing import Any

from contrastive_cli.events import Callback, Loop, StepEnd
from contrastive_cli.tracking import Trackers


class TrackerLog(Callback):
    def __init__(self, trackers: Trackers, log_every: int):
        self.trackers, self.log_every = trackers, log_every

    def step_end(self, loop: Loop, step: StepEnd) -> None:
        if loop.progress.batch % self.log_every == 0:
            self.trackers.log_step(loop.progress.step, {"loss": step.loss_value, "lr": loop.lr})

    def epoch_end(self, loop: Loop, record: dict[str, Any]) -> None:
        self.trackers.log_epoch(record)

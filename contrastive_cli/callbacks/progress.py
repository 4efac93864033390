"""What a person watching sees: the progress of each epoch (a bar on a terminal, a
timestamped line every ``trainer.log_every_s`` seconds elsewhere), and one log line per epoch."""

from __future__ import annotations

import logging
import time
from typing import Any

from contrastive_cli.events import Callback, Loop, StepEnd
from contrastive_cli.progress import Task

log = logging.getLogger(__name__)


class ProgressBar(Callback):
    """A bar per epoch (closed before anything else runs at its end; off a terminal its
    timestamped lines), with the loss and images/s every ``log_every`` steps: the loop's only
    other host sync."""

    def __init__(self, log_every: int):
        self.log_every = log_every
        self.bar: Task | None = None

    def epoch_start(self, loop: Loop) -> None:
        self.bar = Task(
            f"epoch {loop.progress.epoch + 1}/{loop.epochs}",
            total=loop.steps_per_epoch,
            unit="step",
            initial=loop.progress.batch,
        ).__enter__()

    def step_end(self, loop: Loop, step: StepEnd) -> None:
        assert self.bar is not None
        self.bar.update()
        progress = loop.progress
        if progress.batch % self.log_every == 0:
            seconds = progress.epoch_seconds + time.perf_counter() - loop.epoch_started
            rate = (progress.batch * loop.batch_size) / max(seconds, 1e-9)
            self.bar.note(loss=f"{step.loss_value:.4f}", img_s=f"{rate:,.0f}")

    def epoch_end(self, loop: Loop, record: dict[str, Any]) -> None:
        self.close()

    def stop_requested(self, loop: Loop) -> None:
        self.close()

    def run_end(self, loop: Loop, error: BaseException | None) -> None:
        self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None


class EpochLine(Callback):
    """train.log's line for each epoch, with an estimate of the training time left."""

    def epoch_end(self, loop: Loop, record: dict[str, Any]) -> None:
        progress = loop.progress
        left = (loop.epochs - progress.epoch) * progress.train_seconds / max(progress.epoch, 1)
        log.info(
            f"epoch {record['epoch']}/{loop.epochs}  step {record['step']}  "
            f"loss {record['loss']:.4f}  lr {record['lr']:.2e}  "
            f"{record['images_per_s']:,.0f} img/s"
            + (f"  knn {record['knn']:.4f}" if "knn" in record else "")
            + (f"  ~{duration(left)} of training left" if progress.epoch < loop.epochs else "")
        )


def duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return (
        f"{hours} h {minutes} min"
        if hours
        else f"{minutes} min {secs} s"
        if minutes
        else f"{secs} s"
    )

"""A clean stop on SIGINT/SIGTERM: while the loop runs, a signal asks it to stop after the
step; then (after the checkpoint) results.json says ``interrupted`` and the run raises
``Interrupted`` (exit 128 + the signal). See ``contrastive_cli.signals``."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from contrastive_cli.events import Callback, Loop
from contrastive_cli.signals import GracefulStop, Interrupted

log = logging.getLogger(__name__)


class Signals(Callback):
    def __init__(self, stop: GracefulStop, run_dir: Path, report: Callable[[str, Loop, str], None]):
        self.stop, self.run_dir, self.report = stop, run_dir, report

    def run_start(self, loop: Loop) -> None:
        self.stop.graceful = True  # a first signal now finishes the step and saves

    def wants_stop(self) -> bool:
        return self.stop.requested

    def stop_requested(self, loop: Loop) -> None:
        progress = loop.progress
        message = (
            f"stopped at epoch {progress.epoch + 1}/{loop.epochs}, step {progress.step}; "
            "checkpoint saved; "
            f"continue with: contrast resume {self.run_dir}"
        )
        self.report("interrupted", loop, message)
        log.info(message)
        raise Interrupted(self.stop.signum or 2, message)

    def run_end(self, loop: Loop, error: BaseException | None) -> None:
        self.stop.graceful = False

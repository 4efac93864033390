"""A diverged run (a non-finite loss or gradient; the step was not applied) leaves a
results.json that says so, with where it stopped; the error then ends the run."""

from __future__ import annotations

from collections.abc import Callable

from contrastive_cli.errors import Diverged
from contrastive_cli.events import Callback, Loop


class Divergence(Callback):
    def __init__(self, report: Callable[[str, Loop, str], None]):
        self.report = report

    def run_end(self, loop: Loop, error: BaseException | None) -> None:
        if isinstance(error, Diverged):
            self.report("diverged", loop, str(error))

"""``trainer.time_budget``: after the first epoch, fix how many epochs fit the budget.

The user's config is left as it is: the epoch count goes to the loop (``loop.epochs``), to
the schedule, and to ``on_fixed``, which records it where the run keeps its config
(``ConfigRecord.fix_epochs``: the checkpoint's config and .hydra/config.yaml, what
``reproduce`` reruns)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import torch

from contrastive_cli.distributed import Dist, reduce_flags
from contrastive_cli.events import Callback, Loop
from contrastive_cli.schedule import set_total_steps

log = logging.getLogger(__name__)


class TimeBudget(Callback):
    """Always in the list: it also takes the first step's time out of the epoch's record
    (``first_step_s`` is for the budget only, never a logged metric)."""

    def __init__(
        self, budget: str | float | None, dist: Dist, on_fixed: Callable[[int], None]
    ) -> None:
        self.budget, self.dist, self.on_fixed = budget, dist, on_fixed
        self.started = time.time()

    def run_start(self, loop: Loop) -> None:
        self.started = time.time()

    def epoch_end(self, loop: Loop, record: dict[str, Any]) -> None:
        warmup = record.pop("first_step_s", 0.0)
        if self.budget is None or loop.progress.epoch != 1:
            return
        first = time.time() - self.started  # training and monitoring
        steps = loop.steps_per_epoch
        steady = first - warmup + (record["epoch_time_s"] - warmup) / max(steps - 1, 1)
        epochs = fit_to_budget(self.budget, first, steady, self.dist)
        loop.epochs = epochs
        set_total_steps(loop.scheduler, epochs * steps)
        self.on_fixed(epochs)
        if self.dist.main:
            log.info(
                f"trainer.time_budget={self.budget}: the first epoch took {first:.0f} s, "
                f"so {epochs} epoch{'s' if epochs != 1 else ''} (now in .hydra/config.yaml)"
            )


MAX_BUDGET_EPOCHS = 1_000_000  # what a time budget may fix, however fast an epoch is


def fit_to_budget(budget: str | float, first_s: float, steady_s: float, dist: Dist) -> int:
    """How many epochs fit ``trainer.time_budget`` ('15m', '90s', '1h' or seconds): the first
    epoch took ``first_s`` (training and monitoring), each later one should take ``steady_s``
    (the first without its first step's compilation and warm-up, plus one ordinary step);
    the same number on every process."""
    seconds = parse_duration(budget)
    fits = (seconds - first_s) / max(steady_s, 1e-3)  # an epoch is never timed below 1 ms
    epochs = 1 + int(min(max(fits, 0.0), MAX_BUDGET_EPOCHS - 1))  # finite, whatever the budget
    agreed = reduce_flags(torch.tensor([float(epochs) if dist.main else 0.0], dtype=torch.float64))
    return int(agreed.item())


def parse_duration(text: str | float) -> float:
    """'15m' -> 900.0, '90s' -> 90.0, '1.5h' -> 5400.0, 600 -> 600.0."""
    if isinstance(text, (int, float)):
        return float(text)
    value, unit = float(text[:-1]) if text[-1] in "smh" else float(text), text[-1]
    return value * {"s": 1, "m": 60, "h": 3600}.get(unit, 1)

"""Learning-rate schedules, stepped once per optimizer step."""

from __future__ import annotations

import math

import torch
from torch.optim.lr_scheduler import LambdaLR

from contrastive_cli.schema import NonNegative, Probability


class WarmupCosine:
    """Multiplier: linear warmup from ~0 to 1, then cosine decay to ``final_lr_ratio``.

    A class rather than a closure so the scheduler's state_dict stays plain data.
    """

    def __init__(self, warmup_steps: int, total_steps: int, final_lr_ratio: float):
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.final_lr_ratio = final_lr_ratio

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        span = max(self.total_steps - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / span, 1.0)
        return self.final_lr_ratio + (1 - self.final_lr_ratio) * 0.5 * (
            1 + math.cos(math.pi * progress)
        )


def warmup_cosine(
    optimizer: torch.optim.Optimizer,
    steps_per_epoch: int,
    epochs: int,
    warmup_epochs: NonNegative = 1,
    final_lr_ratio: Probability = 0.0,
) -> LambdaLR:
    warmup = min(round(warmup_epochs * steps_per_epoch), steps_per_epoch * epochs)
    return LambdaLR(optimizer, WarmupCosine(warmup, steps_per_epoch * epochs, final_lr_ratio))


def set_total_steps(scheduler: LambdaLR, total_steps: int) -> None:
    """Make ``scheduler`` end after ``total_steps`` (``trainer.time_budget`` fixes the
    length once the first epoch is timed). The warmup is unchanged; steps already taken keep
    the rates they had."""
    lambdas = [f for f in getattr(scheduler, "lr_lambdas", []) if hasattr(f, "total_steps")]
    if not lambdas:
        from contrastive_cli.errors import ConfigError

        raise ConfigError(
            "trainer.time_budget is not allowed with this optim.scheduler: it needs a schedule "
            "that can be told its length; allowed: contrastive_cli.schedule.warmup_cosine"
        )
    for f in lambdas:
        f.total_steps = total_steps
        f.warmup_steps = min(f.warmup_steps, total_steps)

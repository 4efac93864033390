"""The training loop's vocabulary: where training stands (``Progress``), what callbacks see
(``Loop``), and the named events a callback may handle (``Callback``).

The loop (``contrastive_cli.train``) emits, in this order::

    run_start -> (epoch_start -> step_end ... -> epoch_end)* -> run_end
                               step_end -> stop_requested (a stop was asked for) -> run_end

Behaviour that is not the step itself (monitoring, the time budget, progress and logging,
trackers, checkpoints, signals, divergence) is a ``Callback`` in ``contrastive_cli.callbacks``,
each in its own module and testable with a fake ``Loop``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import Tensor, nn

from contrastive_cli.distributed import SINGLE, Dist


@dataclass
class Progress:
    """Where training stands. Plain types only: it is saved in every checkpoint."""

    epoch: int = 0  # completed epochs
    step: int = 0  # optimizer steps taken
    batch: int = 0  # batches done in the unfinished epoch
    step_losses: list[float] = field(default_factory=list)  # that epoch's losses so far
    epoch_seconds: float = 0.0  # that epoch's training time so far
    train_seconds: float = 0.0  # all completed epochs' training time


def progress_from_state(state: object) -> Progress:
    """The Progress a checkpoint holds; ValueError when its fields are not what
    ``dataclasses.asdict(Progress)`` wrote (a checkpoint from elsewhere)."""
    if not isinstance(state, dict) or set(state) != {f.name for f in fields(Progress)}:
        raise ValueError("its progress record has other fields than contrast writes")
    ints = ("epoch", "step", "batch")
    floats = ("epoch_seconds", "train_seconds")
    if not all(
        isinstance(state[k], int) and not isinstance(state[k], bool) and state[k] >= 0 for k in ints
    ):
        raise ValueError("its progress counters are not non-negative integers")
    if not all(isinstance(state[k], (int, float)) for k in floats) or not (
        isinstance(state["step_losses"], list)
        and all(isinstance(v, (int, float)) for v in state["step_losses"])
    ):
        raise ValueError("its progress times or losses are not numbers")
    return Progress(**state)


@dataclass
class Loop:
    """What the loop trains and where it stands, as callbacks see it. ``epochs`` is the only
    field a callback changes (the time budget fixes it after the first epoch)."""

    method: nn.Module  # on the device; what checkpoints and exports hold
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    steps_per_epoch: int
    batch_size: int  # the global batch
    epochs: int
    progress: Progress
    dist: Dist = SINGLE
    epoch_started: float = 0.0  # time.perf_counter() when this session of the epoch began

    @property
    def lr(self) -> float:
        return self.scheduler.get_last_lr()[0]


class StepEnd:
    """One optimizer step's outcome. The loss stays a device tensor until a callback asks
    for its value (one host sync, shared by every callback that reads it)."""

    def __init__(self, loss: Tensor):
        self.loss = loss
        self._value: float | None = None

    @property
    def loss_value(self) -> float:
        if self._value is None:
            self._value = self.loss.item()
        return self._value


class Callback:
    """Handlers of the loop's named events; each does nothing unless a callback overrides it.
    ``record`` is the epoch's metrics.jsonl line, which callbacks may add to (``knn``)."""

    def run_start(self, loop: Loop) -> None:
        pass

    def epoch_start(self, loop: Loop) -> None:
        pass

    def step_end(self, loop: Loop, step: StepEnd) -> None:
        pass

    def epoch_end(self, loop: Loop, record: dict[str, Any]) -> None:
        pass

    def stop_requested(self, loop: Loop) -> None:
        """A stop was asked for (``wants_stop``) and the step is done; raise to end the run."""

    def run_end(self, loop: Loop, error: BaseException | None) -> None:
        """Training ended: completed (``error`` None), or by ``error`` (diverged, stopped)."""

    def wants_stop(self) -> bool:
        """Polled every step (agreed over processes): True asks the loop to stop."""
        return False


class Callbacks:
    """Several callbacks as one, called in the order given."""

    def __init__(self, callbacks: Sequence[Callback] = ()):
        self.callbacks = list(callbacks)

    def _each(self, name: str) -> list[Callable[..., Any]]:
        return [getattr(c, name) for c in self.callbacks]

    def run_start(self, loop: Loop) -> None:
        for handler in self._each("run_start"):
            handler(loop)

    def epoch_start(self, loop: Loop) -> None:
        for handler in self._each("epoch_start"):
            handler(loop)

    def step_end(self, loop: Loop, step: StepEnd) -> None:
        for handler in self._each("step_end"):
            handler(loop, step)

    def epoch_end(self, loop: Loop, record: dict[str, Any]) -> None:
        for handler in self._each("epoch_end"):
            handler(loop, record)

    def stop_requested(self, loop: Loop) -> None:
        for handler in self._each("stop_requested"):
            handler(loop)

    def run_end(self, loop: Loop, error: BaseException | None) -> None:
        for handler in self._each("run_end"):
            handler(loop, error)

    def wants_stop(self) -> bool:
        return any(c.wants_stop() for c in self.callbacks)

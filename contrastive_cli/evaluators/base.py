"""The evaluator interface: a name, whether it needs labels, and a call on features that
returns a flat dict of metrics. A module ``contrastive_cli/evaluators/<name>.py`` with a
``make(settings, seed)`` is an evaluator that ``eval.metrics`` can name."""

from __future__ import annotations

from typing import NamedTuple, Protocol

from torch import Tensor


class Features(NamedTuple):
    """One encoder's frozen features of the train split (the bank, the probe's training set)
    and of the test split, with their labels (None for a label-free evaluator's data)."""

    train_x: Tensor  # (N, D)
    train_y: Tensor | None  # (N,)
    test_x: Tensor  # (M, D)
    test_y: Tensor | None  # (M,)
    num_classes: int


class Evaluator(Protocol):
    name: str
    needs_labels: bool

    def __call__(self, features: Features) -> dict[str, float]: ...

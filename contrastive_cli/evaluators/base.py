"""The evaluator interface: a name, whether it needs labels, and a call on features that
returns a flat dict of metrics. A module ``contrastive_cli/evaluators/<name>.py`` with a
``make(settings, seed)`` is an evaluator that ``eval.metrics`` can name."""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple, Protocol

from torch import Tensor

if TYPE_CHECKING:
    from contrastive_cli.labelfree import SampleFeatures


class Features(NamedTuple):
    """One encoder's frozen features of the train split (the bank, the probe's training set)
    and of the test split, with their labels (None for a label-free evaluator's data), and
    ``sample``: its features of the label-free sample and of two augmented views of it (what
    an evaluator with ``needs_sample = True`` reads; None where none was asked for)."""

    train_x: Tensor | None  # (N, D); None without labelled data
    train_y: Tensor | None  # (N,)
    test_x: Tensor | None  # (M, D)
    test_y: Tensor | None  # (M,)
    num_classes: int
    sample: SampleFeatures | None = None


class Evaluator(Protocol):
    name: str
    needs_labels: bool
    # optional: needs_sample = True asks for Features.sample (the label-free sample)

    def __call__(self, features: Features) -> dict[str, float]: ...

"""Alignment (Wang & Isola 2020, alpha = 2): the mean squared distance between the
L2-normalised features of two augmented views (the training augmentation) of each image of
the label-free sample. 0: the views are not told apart (also a collapsed encoder). No labels."""

from __future__ import annotations

from typing import Any

from contrastive_cli.evaluators.base import Features
from contrastive_cli.labelfree import alignment


class Alignment:
    name = "alignment"
    needs_labels = False
    needs_sample = True

    def __call__(self, f: Features) -> dict[str, float]:
        assert f.sample is not None
        return {"alignment": alignment(*f.sample.views)}


def make(settings: dict[str, Any], seed: int) -> Alignment:
    return Alignment()

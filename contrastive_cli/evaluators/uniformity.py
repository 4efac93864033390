"""Uniformity (Wang & Isola 2020, t = 2): log of the mean Gaussian potential
exp(-2 ||f(x) - f(y)||^2) over the pairs of distinct images of the label-free sample, f the
L2-normalised features (no augmentation). 0: collapsed; lower: more uniform. No labels."""

from __future__ import annotations

from typing import Any

from contrastive_cli.evaluators.base import Features
from contrastive_cli.labelfree import uniformity


class Uniformity:
    name = "uniformity"
    needs_labels = False
    needs_sample = True

    def __call__(self, f: Features) -> dict[str, float]:
        assert f.sample is not None
        return {"uniformity": uniformity(f.sample.clean)}


def make(settings: dict[str, Any], seed: int) -> Uniformity:
    return Uniformity()

"""The linear probe on frozen, standardised features (``linear_top1``, ``linear_top5`` with
more than 10 classes, and the weight decay it chose on a held-out part of train)."""

from __future__ import annotations

from typing import Any

from contrastive_cli.evaluate import linear_probe
from contrastive_cli.evaluators.base import Features


class LinearProbe:
    name = "linear"
    needs_labels = True

    def __init__(self, probe: dict[str, Any], seed: int):
        self.probe, self.seed = dict(probe), seed

    def __call__(self, f: Features) -> dict[str, float]:
        result = linear_probe(
            f.train_x, f.train_y, f.test_x, f.test_y, f.num_classes, seed=self.seed, **self.probe
        )
        metrics = {"linear_top1": result.top1}
        if result.top5 is not None:
            metrics["linear_top5"] = result.top5
        metrics["probe_weight_decay"] = result.weight_decay
        return metrics


def make(settings: dict[str, Any], seed: int) -> LinearProbe:
    """From the ``eval`` section (a plain dict): ``eval.probe``'s settings."""
    return LinearProbe(settings["probe"], seed)

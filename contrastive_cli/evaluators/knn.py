"""k-NN on frozen features: one accuracy per k of ``eval.knn_k`` (``knn_k200``, ``knn_k20``),
the votes weighted by exp(similarity / ``eval.knn_temperature``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from contrastive_cli.evaluate import accuracy, knn_predict
from contrastive_cli.evaluators.base import Features


class Knn:
    name = "knn"
    needs_labels = True

    def __init__(self, ks: Sequence[int], temperature: float):
        self.ks, self.temperature = list(ks), temperature

    def __call__(self, f: Features) -> dict[str, float]:
        preds = knn_predict(
            f.train_x, f.train_y, f.test_x, f.num_classes, self.ks, self.temperature
        )
        return {f"knn_k{k}": accuracy(p, f.test_y) for k, p in preds.items()}


def make(settings: dict[str, Any], seed: int) -> Knn:
    """From the ``eval`` section (a plain dict)."""
    return Knn(settings["knn_k"], settings["knn_temperature"])

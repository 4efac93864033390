"""Evaluators as plug-ins, chosen by ``eval.metrics`` (default ``[knn, linear]``).

An evaluator is a module here, named as ``eval.metrics`` names it, with ``make(settings,
seed)`` returning an object of the ``Evaluator`` interface (``base.py``): adding one is one
module plus its name in ``eval.metrics``. ``evaluate_protocol`` runs the chosen ones, in
order, on each encoder's features (and on raw pixels): results.json's ``metrics`` holds
the keys of what ran.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import pkgutil
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from contrastive_cli.errors import ConfigError
from contrastive_cli.evaluate import extract_features, pixel_features
from contrastive_cli.evaluators.base import Evaluator, Features
from contrastive_cli.progress import Task

__all__ = [
    "Evaluator",
    "Features",
    "available",
    "build_evaluators",
    "evaluate_protocol",
    "unknown_metric",
]
NOT_EVALUATORS = {"base"}
log = logging.getLogger(__name__)


def available() -> list[str]:
    """The names ``eval.metrics`` may hold: the evaluator modules of this package."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name not in NOT_EVALUATORS)


def unknown_metric(names: Sequence[str]) -> str | None:
    """The one-line refusal of ``eval.metrics=names`` when a name is not an evaluator."""
    known = available()
    for name in names:
        if name not in known:
            return (
                f"eval.metrics={list(names)} is not allowed: there is no evaluator {name!r}; "
                f"allowed: a list of {', '.join(known)}"
            )
    return None


def build_evaluators(names: Sequence[str], settings: dict[str, Any], seed: int) -> list[Evaluator]:
    """The evaluators ``names`` (``eval.metrics``), made from the ``eval`` section
    ``settings``; a name that is not one is a ConfigError (one line, exit 2)."""
    if message := unknown_metric(names):
        raise ConfigError(message)
    return [importlib.import_module(f"{__name__}.{name}").make(settings, seed) for name in names]


def evaluate_features(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    num_classes: int,
    knn_ks: Sequence[int],
    knn_temperature: float,
    probe: dict,
    seed: int,
) -> dict[str, float]:
    """k-NN for every k and the linear probe on one set of features -> flat metrics dict."""
    settings = {"knn_k": knn_ks, "knn_temperature": knn_temperature, "probe": probe}
    features = Features(train_x, train_y, test_x, test_y, num_classes)
    return _run(build_evaluators(["knn", "linear"], settings, seed), features)


def _run(evaluators: Sequence[Evaluator], features: Features, label: str = "") -> dict[str, float]:
    """Each evaluator on ``features``; with a ``label`` (the evaluated entry), each shows
    its progress (``contrastive_cli.progress``) as ``<label>: <evaluator>``."""
    metrics: dict[str, float] = {}
    for evaluator in evaluators:
        with Task(f"{label}: {evaluator.name}") if label else contextlib.nullcontext():
            metrics.update(evaluator(features))
    return metrics


def evaluate_protocol(
    encoders: dict[str, nn.Module],
    train_images: Tensor,
    train_labels: Tensor,
    test_images: Tensor,
    test_labels: Tensor,
    num_classes: int,
    transform: Callable[[Tensor], Tensor],
    device: torch.device,
    evaluators: Sequence[Evaluator],
    batch_size: int,
    pixels: bool = True,
    channels_last: bool = False,
    autocast: bool = False,
) -> dict[str, dict[str, float]]:
    """Every encoder in ``encoders`` (and raw pixels) through the same evaluators.

    Returns {name: metrics}; raw pixels appear as ``raw_pixels``. Each metrics dict also
    holds ``seconds``: feature extraction plus the evaluators for that entry.
    """
    train_y, test_y = train_labels.to(device), test_labels.to(device)
    sources: dict[str, Callable[[Tensor, str], Tensor]] = {}
    if pixels:
        sources["raw_pixels"] = lambda images, desc: torch.cat(
            [pixel_features(chunk.to(device)) for chunk in images.split(batch_size)]
        )
    for name, encoder in encoders.items():
        sources[name] = lambda images, desc, enc=encoder: extract_features(
            enc, images, transform, device, batch_size, channels_last, autocast, desc
        )
    results = {}
    names = ", ".join(e.name for e in evaluators)
    for i, (name, features) in enumerate(sources.items(), 1):
        # A line per evaluated entry: the silence after the last epoch took minutes on
        # Fashion-MNIST (features and every evaluator per entry).
        label = EVALUATED.get(name, name)
        log.info(
            f"evaluating {i}/{len(sources)}: {label} (features of {len(train_images):,} train + "
            f"{len(test_images):,} test images, {names})"
        )
        start = time.perf_counter()
        train_x = features(train_images, f"{label}: features of train images")
        test_x = features(test_images, f"{label}: features of test images")
        metrics = _run(evaluators, Features(train_x, train_y, test_x, test_y, num_classes), label)
        metrics["seconds"] = time.perf_counter() - start
        log.info(f"evaluated {label} in {metrics['seconds']:.1f} s")
        results[name] = metrics
    return results


# How evaluate_protocol's progress lines name its entries.
EVALUATED = {
    "raw_pixels": "raw pixels",
    "random_init": "random-init encoder",
    "pretrained": "encoder as loaded (encoder.weights)",
    "trained": "trained encoder",
}

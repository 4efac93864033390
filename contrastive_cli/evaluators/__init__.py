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
from contrastive_cli.labelfree import LabelFreeSample, sample_features
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
    train_images: Tensor | None,
    train_labels: Tensor | None,
    test_images: Tensor | None,
    test_labels: Tensor | None,
    num_classes: int,
    transform: Callable[[Tensor], Tensor],
    device: torch.device,
    evaluators: Sequence[Evaluator],
    batch_size: int,
    pixels: bool = True,
    channels_last: bool = False,
    autocast: bool = False,
    sample: LabelFreeSample | None = None,
    projectors: dict[str, nn.Module] | None = None,
) -> dict[str, dict[str, float]]:
    """Every encoder in ``encoders`` (and raw pixels) through the same evaluators.

    Returns {name: metrics}; raw pixels appear as ``raw_pixels``. Each metrics dict also
    holds ``seconds``: feature extraction plus the evaluators for that entry. Without labels
    (``train_labels`` None) only the label-free evaluators run; they see ``sample`` (the
    label-free sample), and RankMe also ``projectors[name]`` where given.
    """
    labelled = train_labels is not None and test_labels is not None
    # Without labels there is no train/test split: only the evaluators of the sample run.
    chosen = [e for e in evaluators if labelled or getattr(e, "needs_sample", False)]
    wants_sample = sample is not None and any(getattr(e, "needs_sample", False) for e in chosen)
    chosen = [e for e in chosen if wants_sample or not getattr(e, "needs_sample", False)]
    need_split = labelled and any(not getattr(e, "needs_sample", False) for e in chosen)
    if not chosen:
        return {}
    train_y = train_labels.to(device) if labelled else None  # type: ignore[union-attr]
    test_y = test_labels.to(device) if labelled else None  # type: ignore[union-attr]
    sources = _sources(
        encoders, transform, device, batch_size, pixels, channels_last, autocast, sample
    )
    results = {}
    names = ", ".join(e.name for e in chosen)
    for i, (name, (features, view_features)) in enumerate(sources.items(), 1):
        # A line per evaluated entry: the silence after the last epoch took minutes on
        # Fashion-MNIST (features and every evaluator per entry).
        label = EVALUATED.get(name, name)
        what = (
            f"features of {len(train_images):,} train + {len(test_images):,} test images"  # type: ignore[arg-type]
            if need_split
            else f"features of {len(sample.images):,} sample images and 2 views"  # type: ignore[union-attr]
        )
        log.info(f"evaluating {i}/{len(sources)}: {label} ({what}, {names})")
        start = time.perf_counter()
        projector = (projectors or {}).get(name)
        train_x = (
            features(train_images, f"{label}: features of train images") if need_split else None
        )
        test_x = features(test_images, f"{label}: features of test images") if need_split else None
        of_sample = None
        if wants_sample:
            clean = _rows_of(sample, test_images, test_x)  # type: ignore[arg-type]
            of_sample = sample_features(sample, features, view_features, projector, clean)  # type: ignore[arg-type]
        metrics = _run(
            chosen, Features(train_x, train_y, test_x, test_y, num_classes, of_sample), label
        )
        metrics["seconds"] = time.perf_counter() - start
        log.info(f"evaluated {label} in {metrics['seconds']:.1f} s")
        results[name] = metrics
    return results


def _rows_of(sample: LabelFreeSample, split: Any, split_x: Tensor | None) -> Tensor | None:
    """The sample's clean features as rows of ``split_x`` (the features of ``split``) when the
    sample was drawn from that split (the test split of labelled data): one pass saved."""
    if split_x is None or not sample.of_split(split):
        return None
    return split_x[sample.indices.to(split_x.device)]  # type: ignore[union-attr]


FeatureMap = Callable[..., Tensor]  # (images, desc=None) -> features


def _sources(
    encoders: dict[str, nn.Module],
    transform: FeatureMap,
    device: torch.device,
    batch_size: int,
    pixels: bool,
    channels_last: bool,
    autocast: bool,
    sample: LabelFreeSample | None,
) -> dict[str, tuple[FeatureMap, FeatureMap]]:
    """{name: (features of uint8 images, features of augmented float views)}."""
    sources: dict[str, tuple[FeatureMap, FeatureMap]] = {}
    if pixels:

        def pixel_views(views: Tensor) -> Tensor:
            assert sample is not None
            return sample.pixels(views.to(device))

        sources["raw_pixels"] = (
            lambda images, desc=None: torch.cat(
                [pixel_features(chunk.to(device)) for chunk in images.split(batch_size)]
            ),
            pixel_views,
        )
    for name, encoder in encoders.items():
        sources[name] = (
            lambda images, desc=None, enc=encoder: extract_features(
                enc, images, transform, device, batch_size, channels_last, autocast, desc
            ),
            lambda views, enc=encoder: extract_features(
                enc, views, _same, device, batch_size, channels_last, autocast
            ),
        )
    return sources


def _same(x: Tensor) -> Tensor:
    return x


# How evaluate_protocol's progress lines name its entries.
EVALUATED = {
    "raw_pixels": "raw pixels",
    "random_init": "random-init encoder",
    "pretrained": "encoder as loaded (encoder.weights)",
    "trained": "trained encoder",
}

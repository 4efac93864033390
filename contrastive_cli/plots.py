"""PNG plots: training curves, the embedding map of test features, sweep metric vs value."""

from __future__ import annotations

import logging
import math
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")  # files only; no display needed
import matplotlib.pyplot as plt
import numpy as np

from contrastive_cli.progress import Task
from contrastive_cli.rundirs import Run

log = logging.getLogger(__name__)
DPI = 100
CURVES_SIZE = (10, 4)  # inches: 1000 x 400 px
EMBEDDING_SIZE = (7, 7)  # 700 x 700 px


def run_label(run: Run, others: Sequence[Run]) -> str:
    """The shortest label that tells runs apart: their differing overrides, else the dir name."""
    common = set.intersection(*(set(r.overrides) for r in others)) if len(others) > 1 else set()
    own = [o for o in run.overrides if o not in common and not o.startswith("hydra")]
    return " ".join(own) or run.path.name


def plot_curves(series: Sequence[tuple[str, list[dict]]], out: Path) -> Path:
    """Loss and monitor k-NN per epoch from (label, metrics.jsonl records), and where the
    records have them the monitor's label-free metrics (RankMe; alignment and uniformity on
    a second axis); runs share the axes."""
    labelfree = any(k in r for _, records in series for r in records for k in LABEL_FREE)
    fig, axes = plt.subplots(1, 3 if labelfree else 2, figsize=CURVES_SIZE, dpi=DPI)
    ax_loss, ax_knn = axes[0], axes[1]
    for label, records in series:
        if not records:
            continue
        ax_loss.plot(
            [r["epoch"] for r in records], [r["loss"] for r in records], marker=".", label=label
        )
        knn = [(r["epoch"], r["knn"]) for r in records if "knn" in r]
        if knn:
            ax_knn.plot(*zip(*knn, strict=True), marker=".", label=label)
    ax_loss.set(title="training loss", xlabel="epoch", ylabel="loss")
    ax_knn.set(title="monitor k-NN (held-out part of train)", xlabel="epoch", ylabel="accuracy")
    if labelfree:
        _plot_labelfree(axes[2], series)
    for ax in axes:
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    return _save(fig, out)


LABEL_FREE = ("rankme", "alignment", "uniformity")


def _plot_labelfree(ax: plt.Axes, series: Sequence[tuple[str, list[dict]]]) -> None:
    """RankMe (solid, left axis), alignment (dashed) and uniformity (dotted, right axis)."""
    right = ax.twinx()
    for label, records in series:
        for key, axis, style in (
            ("rankme", ax, "-"),
            ("alignment", right, "--"),
            ("uniformity", right, ":"),
        ):
            points = [(r["epoch"], r[key]) for r in records if key in r]
            if points:
                axis.plot(*zip(*points, strict=True), style, marker=".", label=f"{label} {key}")
    ax.set(title="monitor label-free (train sample)", xlabel="epoch", ylabel="RankMe")
    right.set_ylabel("alignment (--), uniformity (:)")
    if right.lines:
        right.legend(fontsize=6, loc="lower right")


def plot_embedding(
    features: np.ndarray,
    labels: np.ndarray,
    out: Path,
    title: str,
    seed: int = 0,
    class_names: Sequence[str] | None = None,
) -> Path:
    """2-D map of features (UMAP when installed, else t-SNE), coloured by class (named in
    the legend when the data has class names)."""
    with Task(f"2-D map (UMAP or t-SNE) of {len(features):,} test features"):
        xy, method = _map_2d(features, seed)  # the slow part of the map
    fig, ax = plt.subplots(figsize=EMBEDDING_SIZE, dpi=DPI)
    classes = np.unique(labels)
    cmap = plt.get_cmap("tab10" if len(classes) <= 10 else "tab20")
    for i, c in enumerate(classes):
        pts = xy[labels == c]
        name = class_names[c] if class_names is not None and 0 <= c < len(class_names) else c
        ax.scatter(pts[:, 0], pts[:, 1], s=4, color=cmap(i % cmap.N), label=str(name))
    ax.set(title=f"{title} ({method}, {len(features)} test images)", xticks=[], yticks=[])
    if len(classes) <= 20:
        ax.legend(markerscale=3, fontsize=7, loc="best")
    return _save(fig, out)


def _map_2d(features: np.ndarray, seed: int) -> tuple[np.ndarray, str]:
    """(N, D) -> (N, 2) by UMAP when installed, else t-SNE; and which one ran."""
    try:
        import umap  # type: ignore[import-not-found]

        return umap.UMAP(random_state=seed).fit_transform(features), "UMAP"
    except ImportError:
        from sklearn.manifold import TSNE

        perplexity = float(min(30, max(2, (len(features) - 1) // 3)))
        tsne = TSNE(n_components=2, init="pca", random_state=seed, perplexity=perplexity)
        return tsne.fit_transform(features), "t-SNE"


def swept_keys(runs: Sequence[Run]) -> dict[str, list[str]]:
    """Override keys whose value differs between runs -> each run's value ('' when unset)."""
    values = [
        dict(o.split("=", 1) for o in r.overrides if "=" in o and not o.startswith("hydra"))
        for r in runs
    ]
    keys = sorted({k for v in values for k in v})
    return {
        k: [v.get(k, "") for v in values] for k in keys if len({v.get(k, "") for v in values}) > 1
    }


def sweep_scores(runs: Sequence[Run], metric: str | None = None) -> tuple[list[float], str]:
    """Each run's ``metric`` (NaN where missing) and the axis label. ``metric`` None: each
    run's headline k-NN accuracy, the first k of its ``eval.knn_k`` (what sweeps optimise)."""
    from contrastive_cli.report import knn_keys, metric_label

    all_metrics = [(r.results or {}).get("metrics") or {} for r in runs]
    keys = [metric or next(iter(knn_keys(m)), "") for m in all_metrics]
    scores = [float(m.get(k, math.nan)) for m, k in zip(all_metrics, keys, strict=True)]
    named = {k for k in keys if k}
    return scores, metric_label(named.pop()) if len(named) == 1 else "k-NN (first of eval.knn_k)"


def one_sweep(runs: Sequence[Run]) -> bool:
    """The runs are jobs of one Hydra sweep: one parent folder, which holds the basic
    sweeper's multirun.yaml or only job folders named ``<job number>_...`` (other sweepers)."""
    parents = {r.path.parent for r in runs}
    if len(parents) != 1:
        return False
    parent = parents.pop()
    numbered = all(re.match(r"\d+_", r.path.name) for r in runs)
    return (parent / "multirun.yaml").is_file() or numbered


def plot_sweep(runs: Sequence[Run], out: Path, metric: str | None = None) -> Path | None:
    """The metric against each swept value (one panel per swept key), every point labelled
    with its run; None if nothing was swept or the runs are not one sweep's jobs (runs of
    different sweeps or none differ in more than the swept keys, so the plot would mislead).
    ``metric`` None: the headline k-NN accuracy (see ``sweep_scores``)."""
    swept = swept_keys(runs)
    if not swept or not one_sweep(runs):
        return None
    scores, ylabel = sweep_scores(runs, metric)
    fig, axes = plt.subplots(1, len(swept), figsize=(4.5 * len(swept), 4), dpi=DPI, squeeze=False)
    for ax, (key, values) in zip(axes[0], swept.items(), strict=True):
        try:
            xs: list = [float(v) for v in values]
            numeric = True
        except ValueError:
            order = sorted(set(values))
            xs, numeric = [order.index(v) for v in values], False
            ax.set_xticks(range(len(order)), order, rotation=30)
        ax.scatter(xs, scores)
        for x, y, run in zip(xs, scores, runs, strict=True):
            ax.annotate(
                run.path.name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7
            )
        if numeric and len(set(xs)) > 1 and min(xs) > 0 and max(xs) / min(xs) >= 100:
            ax.set_xscale("log")
        ax.set(title=key, xlabel=key, ylabel=ylabel)
        ax.grid(alpha=0.3)
    return _save(fig, out)


def _save(fig: plt.Figure, out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():  # long labels: the layout stays as it is, no warning
        warnings.filterwarnings("ignore", message="Tight layout not applied")
        fig.tight_layout()
    fig.savefig(out, dpi=DPI)
    plt.close(fig)
    return out

"""The end of a completed run: export the encoder, evaluate it beside the baselines, plot,
write results.json. Also the embedding map of a finished run (`contrast plot`)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from contrastive_cli.config import build
from contrastive_cli.data.batches import derive_seed
from contrastive_cli.data.datasets import ImageData
from contrastive_cli.device import Runtime
from contrastive_cli.evaluate import extract_features
from contrastive_cli.events import Progress
from contrastive_cli.labelfree import projector_of
from contrastive_cli.parts import load_data
from contrastive_cli.progress import configure as progress_lines
from contrastive_cli.report import results_table, versions
from contrastive_cli.rundirs import Run
from contrastive_cli.runfiles import RunFiles
from contrastive_cli.tracking import EmbeddingSample, Trackers
from contrastive_cli.validate import validate
from contrastive_cli.weights import load_trained_encoder

if TYPE_CHECKING:
    from contrastive_cli.builder import Built

log = logging.getLogger(__name__)


def finish(
    built: Built,
    files: RunFiles,
    summary: dict[str, Any],
    progress: Progress,
    records: list[dict],
    started: float,
    trackers: Trackers,
    title: str,
) -> dict[str, Any]:
    """Export the encoder, evaluate it beside the baselines, plot, write results.json;
    ``title``: the embedding map's ("<loss> on <data>")."""
    s = built.settings
    encoder = built.training.method.encoder
    files.encoder(encoder, built.encoder_metadata)
    results: dict[str, Any] = {
        "status": "completed",
        **summary,
        "steps": progress.step,
        "images": {name: len(split) for name, split in built.data.named_splits().items()},
        "train_time_s": progress.train_seconds,
        "images_per_s": progress.step * s.batch_size / max(progress.train_seconds, 1e-9),
    }
    eval_start = time.perf_counter()
    projector = projector_of(built.training.method)
    results["metrics"], results["baselines"], results["baselines_from_cache"] = built.evaluation(
        encoder, built.data, built.augment, built.runtime, projector
    )
    if not built.data.labelled:
        results["eval_skipped"] = (
            "the data has no labels: k-NN, the probes and retrieval are skipped "
            "(label-free metrics only)"
        )
        log.info(results["eval_skipped"])
    results["eval_time_s"] = time.perf_counter() - eval_start
    # One feature extraction for the embedding map and TensorBoard's projector.
    sample = None
    if s.plots or trackers:
        log.info(
            f"embedding map: features of up to {s.embedding[0]:,} test images"
            + (", then t-SNE (or UMAP) and plots/" if s.plots else "")
        )
        sample = embedding_sample(encoder, built.data, built.augment, built.runtime, *s.embedding)
        trackers.log_embedding(sample, progress.step)
    if s.plots:
        _plot_run(files, records, sample, title, s.seed)
    results["wall_time_s"] = time.time() - started
    results["versions"] = versions()
    files.results(results)
    if "metrics" in results:
        log.info("\n" + results_table(results))
    log.info(f"results: {files.path / 'results.json'}")
    return results


def embedding_sample(
    encoder: nn.Module,
    data: ImageData,
    augment: Any,
    runtime: Runtime,
    points: int,
    batch_size: int,
    seed: int,
) -> EmbeddingSample | None:
    """Up to ``points`` (``eval.embedding_points``) test images, a fixed subset chosen by
    ``seed``, and their features: what the embedding map and TensorBoard's projector show.
    None without labelled test images."""
    if data.test is None or data.test.labels is None or points <= 0:
        return None
    g = torch.Generator().manual_seed(derive_seed(seed, "embedding"))
    idx = torch.randperm(len(data.test), generator=g)[:points]
    features = extract_features(
        encoder,
        data.test.images[idx],
        augment.normalize,
        runtime.device,
        batch_size,
        runtime.channels_last,
        runtime.autocast,
    )
    return EmbeddingSample(
        features.float().cpu(), data.test.labels[idx], data.test.images[idx], data.class_names
    )


def plot_embedding_of(
    sample: EmbeddingSample | None, out: Path, title: str, seed: int
) -> Path | None:
    """The embedding map of ``sample`` (None: no map)."""
    from contrastive_cli.plots import plot_embedding

    if sample is None:
        return None
    return plot_embedding(
        sample.features.numpy(), sample.labels.numpy(), out, title, seed, sample.class_names
    )


def embedding_map(run: Run, out: Path) -> Path | None:
    """The embedding map of a finished run's encoder (rebuilt from its saved config)."""
    weights = run.path / "encoder.safetensors"
    if not weights.is_file():
        return None
    cfg = run.config()
    validate(cfg)
    progress_lines(cfg.trainer.get("log_every_s"))
    runtime = build(cfg.device)
    data = load_data(cfg)
    encoder = load_trained_encoder(cfg, weights)
    title = f"{run.choices.get('loss', '')} on {cfg.data.name}"
    sample = embedding_sample(
        encoder.to(runtime.device),
        data,
        build(cfg.data.augment),
        runtime,
        cfg.eval.embedding_points,
        cfg.eval.batch_size,
        cfg.trainer.seed,
    )
    return plot_embedding_of(sample, out, title, cfg.trainer.seed)


def _plot_run(
    files: RunFiles, records: list[dict], sample: EmbeddingSample | None, title: str, seed: int
) -> None:
    """plots/curves.png and plots/embedding.png; a failed plot is a warning, never a failed run."""
    from contrastive_cli.plots import plot_curves

    try:
        plot_curves([(files.path.name, records)], files.file(Path("plots") / "curves.png"))
        plot_embedding_of(sample, files.file(Path("plots") / "embedding.png"), title, seed)
    except Exception as e:
        log.warning(f"plots were not written: {type(e).__name__}: {e}")

"""One run: build everything from the config, train, export, evaluate, write the run dir.

The CLI calls ``run_training``; tests call it too, with a composed config and a temp dir.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file

from contrastive_cli.baselines import BaselineCache, baseline_keys, cache_dir
from contrastive_cli.checkpoint import latest_valid_checkpoint, load_checkpoint, save_checkpoint
from contrastive_cli.config import build
from contrastive_cli.data.batches import Batches, derive_seed
from contrastive_cli.data.datasets import ImageData
from contrastive_cli.device import Runtime
from contrastive_cli.errors import ConfigError, DataError, Diverged, RunExists
from contrastive_cli.evaluate import (
    PROTOCOL_VERSION,
    KnnMonitor,
    evaluate_protocol,
    extract_features,
)
from contrastive_cli.report import MetricsLog, results_table, versions, write_json
from contrastive_cli.rundirs import Run
from contrastive_cli.signals import GracefulStop, Interrupted
from contrastive_cli.train import Hooks, Progress, train
from contrastive_cli.validate import check_data, validate

log = logging.getLogger(__name__)
CHECKPOINT = Path("checkpoints") / "last.pt"


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        import os

        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.benchmark = True


def load_data(cfg: DictConfig) -> ImageData:
    """The data source of ``cfg.data``, checked against the shape the config declares."""
    try:
        data: ImageData = build(cfg.data.source)
    except InstantiationException as e:  # unreadable files or folders: permissions, I/O errors
        if not isinstance(e.__cause__, OSError):
            raise
        err = e.__cause__
        raise DataError(
            f"data={cfg.data.name}: cannot read {err.filename or cfg.data.root} "
            f"({err.strerror or err})"
        ) from None
    _, c, h, w = data.pretrain.images.shape
    if c != cfg.data.channels or h != cfg.data.image_size or w != cfg.data.image_size:
        raise DataError(
            f"data={cfg.data.name}: images are {c}x{h}x{w} but the config says "
            f"data.channels={cfg.data.channels}, data.image_size={cfg.data.image_size}"
        )
    return data


def build_encoder(cfg: DictConfig, seed: int) -> torch.nn.Module:
    """The encoder, initialised on the CPU from ``seed`` alone (same weights on any device)."""
    torch.manual_seed(seed)
    return build(cfg.encoder, in_channels=cfg.data.channels, image_size=cfg.data.image_size)


def encoder_metadata(cfg: DictConfig) -> dict[str, str]:
    """What encoder.safetensors carries so it can be rebuilt without its run directory."""
    return {
        "format": "contrast-encoder-v1",
        "encoder": json.dumps(OmegaConf.to_container(cfg.encoder, resolve=True)),
        "data": str(cfg.data.name),
        "channels": str(cfg.data.channels),
        "image_size": str(cfg.data.image_size),
        "seed": str(cfg.trainer.seed),
    }


def evaluate_encoder(
    cfg: DictConfig,
    encoder: torch.nn.Module,
    data: ImageData,
    augment: Any,
    runtime: Runtime,
    seed: int,
) -> tuple[dict[str, float], dict[str, dict[str, float]], dict[str, bool]]:
    """The evaluation protocol for ``encoder`` and, when ``eval.baselines``, for raw pixels and
    the same encoder freshly initialised from ``seed`` (its weights before training).

    Returns (metrics, baselines, {baseline: whether it came from the cache}). With
    ``eval.cache_baselines`` a baseline computed once for the same data, settings and
    encoder config is read from the cache (``contrastive_cli.baselines``) instead.
    """
    assert data.train is not None and data.test is not None
    keys: dict[str, dict[str, Any]] = {}  # none: nothing is read from or written to the cache
    if cfg.eval.baselines and cfg.eval.get("cache_baselines", True):
        encoder_config = OmegaConf.to_container(cfg.encoder, resolve=True)
        keys = baseline_keys(cfg, data, runtime, seed, encoder_config, PROTOCOL_VERSION) or {}
    cache = BaselineCache(cache_dir())
    cached: dict[str, dict[str, float]] = {}
    for name, key in keys.items():
        start = time.perf_counter()
        found = cache.get(name, key)
        if found is not None:
            cached[name] = found | {"seconds": time.perf_counter() - start}
            log.info(f"{name} baseline: from the cache ({cache.path(name, key)})")
    encoders = {"trained": encoder}
    if cfg.eval.baselines and "random_init" not in cached:
        memory_format = torch.channels_last if runtime.channels_last else torch.preserve_format
        encoders["random_init"] = build_encoder(cfg, seed).to(
            runtime.device, memory_format=memory_format
        )
    evaluated = evaluate_protocol(
        encoders,
        data.train.images,
        data.train.labels,
        data.test.images,
        data.test.labels,
        data.num_classes,
        augment.normalize,
        runtime.device,
        OmegaConf.to_container(cfg.eval),
        seed,
        pixels=cfg.eval.baselines and "raw_pixels" not in cached,
        channels_last=runtime.channels_last,
        autocast=runtime.autocast,
    )
    metrics = evaluated.pop("trained")
    for name, result in evaluated.items():
        if name in keys:
            cache.put(name, keys[name], {k: v for k, v in result.items() if k != "seconds"})
    baselines = {
        name: cached[name] if name in cached else evaluated[name]
        for name in ("raw_pixels", "random_init")
        if name in cached or name in evaluated
    }
    return metrics, baselines, {name: name in cached for name in baselines}


def plot_embedding_of(
    encoder: torch.nn.Module,
    data: ImageData,
    augment: Any,
    runtime: Runtime,
    cfg: DictConfig,
    out: Path,
    title: str,
) -> Path | None:
    """The embedding map of up to ``eval.embedding_points`` test images (a fixed subset)."""
    from contrastive_cli.plots import plot_embedding

    if data.test is None or data.test.labels is None or cfg.eval.embedding_points <= 0:
        return None
    g = torch.Generator().manual_seed(derive_seed(cfg.trainer.seed, "embedding"))
    idx = torch.randperm(len(data.test), generator=g)[: cfg.eval.embedding_points]
    features = extract_features(
        encoder,
        data.test.images[idx],
        augment.normalize,
        runtime.device,
        cfg.eval.batch_size,
        runtime.channels_last,
        runtime.autocast,
    )
    return plot_embedding(
        features.cpu().numpy(), data.test.labels[idx].numpy(), out, title, cfg.trainer.seed
    )


def embedding_map(run: Run, out: Path) -> Path | None:
    """The embedding map of a finished run's encoder (rebuilt from its saved config)."""
    from safetensors.torch import load_file

    weights = run.path / "encoder.safetensors"
    if not weights.is_file():
        return None
    cfg = run.config()
    runtime = build(cfg.device)
    data = load_data(cfg)
    encoder = build_encoder(cfg, cfg.trainer.seed)
    encoder.load_state_dict(load_file(str(weights)))
    title = f"{run.choices.get('loss', '')} on {cfg.data.name}"
    return plot_embedding_of(
        encoder.to(runtime.device), data, build(cfg.data.augment), runtime, cfg, out, title
    )


class Training(NamedTuple):
    method: torch.nn.Module  # on the device
    step_fn: Callable[..., torch.Tensor]  # the method, or torch.compile(method)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    batches: Batches


def build_training(
    cfg: DictConfig, runtime: Runtime, data: ImageData, encoder: torch.nn.Module
) -> Training:
    """What ``train`` needs, built from ``cfg`` around ``encoder`` (also used by ``make bench``)."""
    t = cfg.trainer
    method = build(cfg.loss, encoder=encoder).to(runtime.device)
    if runtime.channels_last:
        method = method.to(memory_format=torch.channels_last)
    step_fn = torch.compile(method) if runtime.compile else method
    optimizer = build(cfg.optim.optimizer)([p for p in method.parameters() if p.requires_grad])
    try:
        batches = data.pretrain.batches(
            t.batch_size, t.seed, runtime.device, runtime.data_on_device
        )
    except ValueError as e:
        raise ConfigError(str(e)) from None
    scheduler = build(cfg.optim.scheduler)(optimizer, steps_per_epoch=len(batches), epochs=t.epochs)
    return Training(method, step_fn, optimizer, scheduler, batches)


def run_training(
    cfg: DictConfig, run_dir: Path, choices: dict[str, str] | None = None
) -> dict[str, Any]:
    """Train and evaluate the run that ``cfg`` describes, in ``run_dir``. Returns results.json."""
    started = time.time()
    validate(cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    if not cfg.trainer.resume and any(
        (run_dir / f).exists() for f in ("results.json", str(CHECKPOINT.parent))
    ):
        raise RunExists(
            f"run directory {run_dir} already holds a run; resume it with `contrast resume {run_dir}` "
            "or choose a new directory"
        )
    handler = _log_to(run_dir / "train.log")
    try:
        with GracefulStop() as stop:
            return _run(cfg, run_dir, choices or {}, started, stop)
    except Interrupted as e:
        status = (
            json.loads((run_dir / "results.json").read_text())
            if (run_dir / "results.json").exists()
            else {}
        )
        if status.get("status") != "interrupted":  # stopped outside the loop: nothing new to save
            write_json(
                run_dir / "results.json",
                {"status": "interrupted", "run_dir": str(run_dir), "error": str(e)},
            )
            log.info(str(e))
        raise
    finally:
        logging.getLogger("contrastive_cli").removeHandler(handler)
        handler.close()


def _run(
    cfg: DictConfig, run_dir: Path, choices: dict[str, str], started: float, stop: GracefulStop
) -> dict[str, Any]:
    t = cfg.trainer
    seed_everything(t.seed, t.deterministic)
    runtime: Runtime = build(cfg.device)
    data = load_data(cfg)
    check_data(cfg, data)
    augment = build(cfg.data.augment)
    encoder = build_encoder(cfg, t.seed)
    method, step_fn, optimizer, scheduler, batches = build_training(cfg, runtime, data, encoder)

    progress = Progress()
    checkpoint = run_dir / CHECKPOINT
    resume_from = latest_valid_checkpoint(checkpoint.parent) if t.resume else None
    if resume_from is not None:
        state = load_checkpoint(resume_from, map_location=runtime.device)
        method.load_state_dict(state["method"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        progress = Progress(**state["progress"])
        log.info(f"resuming from {resume_from}: epoch {progress.epoch}, step {progress.step}")
    metrics_log = MetricsLog(run_dir / "metrics.jsonl", keep_epochs=progress.epoch)

    monitor = None
    if data.train is not None and data.train.labels is not None and cfg.eval.every > 0:
        monitor = KnnMonitor(
            data.train.images,
            data.train.labels,
            data.num_classes,
            augment.normalize,
            runtime.device,
            cfg.eval.monitor_bank,
            cfg.eval.monitor_queries,
            cfg.eval.knn_k[0],
            cfg.eval.knn_temperature,
            t.seed,
            cfg.eval.batch_size,
            runtime.channels_last,
            runtime.autocast,
        )
    resolved = OmegaConf.to_container(cfg, resolve=True)

    def save(progress: Progress) -> None:
        save_checkpoint(
            checkpoint,
            {
                "method": method.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "progress": dataclasses.asdict(progress),
                "config": resolved,
            },
        )

    def end_epoch(progress: Progress, record: dict) -> None:
        if monitor is not None and (
            progress.epoch % cfg.eval.every == 0 or progress.epoch == t.epochs
        ):
            record["knn"] = monitor(method.encoder)
        metrics_log.append(record)
        log.info(
            f"epoch {record['epoch']}/{t.epochs}  step {record['step']}  loss {record['loss']:.4f}  "
            f"lr {record['lr']:.2e}  {record['images_per_s']:,.0f} img/s"
            + (f"  knn {record['knn']:.4f}" if "knn" in record else "")
        )
        if t.checkpoint:
            save(progress)

    summary: dict[str, Any] = {
        "run_dir": str(run_dir),
        "data": cfg.data.name,
        "encoder": choices.get("encoder"),
        "loss": choices.get("loss"),
        "epochs": t.epochs,
        "seed": t.seed,
        "device": runtime.describe(),
    }

    def stopped(status: str, progress: Progress, error: str) -> dict[str, Any]:
        return {
            "status": status,
            **summary,
            "error": error,
            "epoch": progress.epoch,
            "steps": progress.step,
            "wall_time_s": time.time() - started,
            "versions": versions(),
        }

    log.info(
        f"training {choices.get('loss', '')} on {cfg.data.name} ({len(data.pretrain)} images, "
        f"{len(batches)} steps/epoch) on {runtime.describe()}; run dir {run_dir}"
    )

    def interrupted(progress: Progress) -> Interrupted:
        message = (
            f"stopped at epoch {progress.epoch + 1}, step {progress.step}; checkpoint saved; "
            f"continue with: contrast resume {run_dir}"
        )
        write_json(run_dir / "results.json", stopped("interrupted", progress, message))
        log.info(message)
        return Interrupted(stop.signum or 2, message)

    hooks = Hooks(
        end_epoch=end_epoch,
        save=save,
        stop_requested=lambda: stop.requested,
        interrupted=interrupted,
    )
    stop.graceful = True
    try:
        progress = train(
            step_fn,
            optimizer,
            scheduler,
            batches,
            augment,
            runtime,
            t.epochs,
            t.seed,
            progress,
            hooks,
            t.log_every,
            t.grad_clip,
        )
    except Diverged as e:
        write_json(run_dir / "results.json", stopped("diverged", progress, str(e)))
        raise
    finally:
        stop.graceful = False

    encoder = method.encoder
    save_file(
        {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()},
        str(run_dir / "encoder.safetensors"),
        metadata=encoder_metadata(cfg),
    )

    results: dict[str, Any] = {
        "status": "completed",
        **summary,
        "steps": progress.step,
        "train_time_s": progress.train_seconds,
        "images_per_s": progress.step * t.batch_size / max(progress.train_seconds, 1e-9),
    }
    eval_start = time.perf_counter()
    if data.labelled:
        results["metrics"], results["baselines"], results["baselines_from_cache"] = (
            evaluate_encoder(cfg, encoder, data, augment, runtime, t.seed)
        )
    else:
        results["eval_skipped"] = "the data has no labels: k-NN and the linear probe are skipped"
        log.info(results["eval_skipped"])
    results["eval_time_s"] = time.perf_counter() - eval_start
    if cfg.eval.plots:
        _plot_run(run_dir, metrics_log.records(), encoder, data, augment, runtime, cfg, choices)
    results["wall_time_s"] = time.time() - started
    results["versions"] = versions()
    write_json(run_dir / "results.json", results)
    if "metrics" in results:
        log.info("\n" + results_table(results))
    log.info(f"results: {run_dir / 'results.json'}")
    return results


def _plot_run(
    run_dir: Path,
    records: list[dict],
    encoder: torch.nn.Module,
    data: ImageData,
    augment: Any,
    runtime: Runtime,
    cfg: DictConfig,
    choices: dict[str, str],
) -> None:
    """plots/curves.png and plots/embedding.png; a failed plot is a warning, never a failed run."""
    from contrastive_cli.plots import plot_curves

    try:
        plot_curves([(run_dir.name, records)], run_dir / "plots" / "curves.png")
        plot_embedding_of(
            encoder,
            data,
            augment,
            runtime,
            cfg,
            run_dir / "plots" / "embedding.png",
            f"{choices.get('loss', '')} on {cfg.data.name}",
        )
    except Exception as e:
        log.warning(f"plots were not written: {type(e).__name__}: {e}")


def _log_to(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    logger = logging.getLogger("contrastive_cli")
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    return handler

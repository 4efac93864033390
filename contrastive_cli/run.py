"""One run: build everything from the config, train, export, evaluate, write the run dir.

The CLI calls ``run_training``; tests call it too, with a composed config and a temp dir.
"""

from __future__ import annotations

import copy
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
from omegaconf import DictConfig, OmegaConf
from safetensors.torch import save_file

from contrastive_cli.checkpoint import load_checkpoint, save_checkpoint
from contrastive_cli.config import build
from contrastive_cli.data.batches import InMemoryBatches
from contrastive_cli.data.datasets import ImageData
from contrastive_cli.device import Runtime
from contrastive_cli.errors import ConfigError, DataError
from contrastive_cli.evaluate import KnnMonitor, evaluate_protocol
from contrastive_cli.report import MetricsLog, results_table, versions, write_json
from contrastive_cli.train import Progress, train

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
    data: ImageData = build(cfg.data.source)
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


class Training(NamedTuple):
    method: torch.nn.Module                              # on the device
    step_fn: Callable[..., torch.Tensor]                 # the method, or torch.compile(method)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    batches: InMemoryBatches


def build_training(cfg: DictConfig, runtime: Runtime, data: ImageData, encoder: torch.nn.Module) -> Training:
    """What ``train`` needs, built from ``cfg`` around ``encoder`` (also used by ``make bench``)."""
    t = cfg.trainer
    method = build(cfg.loss, encoder=encoder).to(runtime.device)
    if runtime.channels_last:
        method = method.to(memory_format=torch.channels_last)
    step_fn = torch.compile(method) if runtime.compile else method
    optimizer = build(cfg.optim.optimizer)([p for p in method.parameters() if p.requires_grad])
    try:
        batches = InMemoryBatches(data.pretrain, t.batch_size, t.seed, runtime.device, runtime.data_on_device)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    scheduler = build(cfg.optim.scheduler)(optimizer, steps_per_epoch=len(batches), epochs=t.epochs)
    return Training(method, step_fn, optimizer, scheduler, batches)


def run_training(cfg: DictConfig, run_dir: Path, choices: dict[str, str] | None = None) -> dict[str, Any]:
    """Train and evaluate the run that ``cfg`` describes, in ``run_dir``. Returns results.json."""
    started = time.time()
    run_dir.mkdir(parents=True, exist_ok=True)
    handler = _log_to(run_dir / "train.log")
    try:
        return _run(cfg, run_dir, choices or {}, started)
    finally:
        logging.getLogger("contrastive_cli").removeHandler(handler)
        handler.close()


def _run(cfg: DictConfig, run_dir: Path, choices: dict[str, str], started: float) -> dict[str, Any]:
    t = cfg.trainer
    seed_everything(t.seed, t.deterministic)
    runtime: Runtime = build(cfg.device)
    data = load_data(cfg)
    augment = build(cfg.data.augment)
    encoder = build_encoder(cfg, t.seed)
    random_init = copy.deepcopy(encoder)                      # the random-encoder baseline
    method, step_fn, optimizer, scheduler, batches = build_training(cfg, runtime, data, encoder)

    progress = Progress()
    checkpoint = run_dir / CHECKPOINT
    if t.resume and checkpoint.exists():
        state = load_checkpoint(checkpoint, map_location=runtime.device)
        method.load_state_dict(state["method"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        progress = Progress(**state["progress"])
        log.info(f"resuming from {checkpoint}: epoch {progress.epoch}, step {progress.step}")
    metrics_log = MetricsLog(run_dir / "metrics.jsonl", keep_epochs=progress.epoch)

    monitor = None
    if data.train is not None and data.train.labels is not None and cfg.eval.every > 0:
        monitor = KnnMonitor(
            data.train.images, data.train.labels, data.num_classes, augment.normalize, runtime.device,
            cfg.eval.monitor_bank, cfg.eval.monitor_queries, cfg.eval.knn_k[0], cfg.eval.knn_temperature,
            t.seed, cfg.eval.batch_size, runtime.channels_last, runtime.autocast,
        )
    resolved = OmegaConf.to_container(cfg, resolve=True)

    def end_epoch(progress: Progress, record: dict) -> None:
        if monitor is not None and (progress.epoch % cfg.eval.every == 0 or progress.epoch == t.epochs):
            record["knn"] = monitor(method.encoder)
        metrics_log.append(record)
        log.info(
            f"epoch {record['epoch']}/{t.epochs}  step {record['step']}  loss {record['loss']:.4f}  "
            f"lr {record['lr']:.2e}  {record['images_per_s']:,.0f} img/s"
            + (f"  knn {record['knn']:.4f}" if "knn" in record else "")
        )
        if t.checkpoint:
            save_checkpoint(checkpoint, {
                "method": method.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "progress": dataclasses.asdict(progress),
                "config": resolved,
            })

    log.info(f"training {choices.get('loss', '')} on {cfg.data.name} ({len(data.pretrain)} images, "
             f"{len(batches)} steps/epoch) on {runtime.describe()}; run dir {run_dir}")
    progress = train(step_fn, optimizer, scheduler, batches, augment, runtime, t.epochs, t.seed,
                     progress, end_epoch, t.log_every)

    encoder = method.encoder
    save_file({k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()},
              str(run_dir / "encoder.safetensors"),
              metadata={"config": json.dumps(resolved["encoder"]), "data": cfg.data.name,
                        "channels": str(cfg.data.channels), "image_size": str(cfg.data.image_size)})

    results: dict[str, Any] = {
        "status": "completed", "run_dir": str(run_dir),
        "data": cfg.data.name, "encoder": choices.get("encoder"), "loss": choices.get("loss"),
        "epochs": t.epochs, "steps": progress.step, "seed": t.seed, "device": runtime.describe(),
        "train_time_s": progress.train_seconds,
        "images_per_s": progress.step * t.batch_size / max(progress.train_seconds, 1e-9),
    }
    eval_start = time.perf_counter()
    if data.labelled:
        encoders = {"trained": encoder}
        if cfg.eval.baselines:
            encoders["random_init"] = random_init.to(runtime.device)
        evaluated = evaluate_protocol(
            encoders, data.train.images, data.train.labels, data.test.images, data.test.labels,
            data.num_classes, augment.normalize, runtime.device, OmegaConf.to_container(cfg.eval),
            t.seed, pixels=cfg.eval.baselines, channels_last=runtime.channels_last, autocast=runtime.autocast,
        )
        results["metrics"] = evaluated.pop("trained")
        results["baselines"] = evaluated
    else:
        log.info("the data has no labels: k-NN and the linear probe are skipped")
    results["eval_time_s"] = time.perf_counter() - eval_start
    results["wall_time_s"] = time.time() - started
    results["versions"] = versions()
    write_json(run_dir / "results.json", results)
    if "metrics" in results:
        log.info("\n" + results_table(results))
    log.info(f"results: {run_dir / 'results.json'}")
    return results


def _log_to(path: Path) -> logging.Handler:
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    logger = logging.getLogger("contrastive_cli")
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    return handler

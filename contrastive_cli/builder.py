"""Build once: the validated config in, one typed object out (``Built``) holding everything a
run needs; nothing below it (the loop, its callbacks, the end of the run) reads the config.

Trackers are built before this (``contrastive_cli.run``), so that they hear of a build that
fails; the config as the run records it is ``contrastive_cli.record.ConfigRecord``.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import math
from collections.abc import Callable

import torch
from omegaconf import DictConfig
from torch.nn.parallel import DistributedDataParallel

from contrastive_cli.config import build
from contrastive_cli.data.augment import Augment
from contrastive_cli.data.batches import batches_of
from contrastive_cli.data.datasets import ImageData
from contrastive_cli.device import Runtime
from contrastive_cli.distributed import SINGLE, Dist, convert_sync_batchnorm
from contrastive_cli.errors import ConfigError
from contrastive_cli.evaluate import KnnMonitor
from contrastive_cli.evaluation import Evaluation, evaluation_of
from contrastive_cli.events import Callback, Loop, Progress
from contrastive_cli.labelfree import LABEL_FREE_METRICS, LabelFreeMonitor
from contrastive_cli.parts import build_encoder, encoder_metadata, load_data, seed_everything
from contrastive_cli.starting import starting_weights
from contrastive_cli.train import Training, train
from contrastive_cli.validate import check_data

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Settings:
    """The plain values of the config that the run reads after building."""

    epochs: int
    batch_size: int
    seed: int
    resume: bool
    checkpoint: bool  # after epochs, at most every checkpoint_every_s, and after the last
    checkpoint_every_s: float
    log_every: int
    grad_clip: float
    time_budget: str | float | None
    monitor_every: int  # eval.every
    plots: bool
    embedding: tuple[int, int, int]  # (eval.embedding_points, eval.batch_size, seed)
    data: str  # data.name

    @staticmethod
    def of(cfg: DictConfig) -> Settings:
        t, ev = cfg.trainer, cfg.eval
        return Settings(
            epochs=int(t.epochs),
            batch_size=int(t.batch_size),
            seed=int(t.seed),
            resume=bool(t.resume),
            checkpoint=bool(t.checkpoint),
            checkpoint_every_s=float(t.get("checkpoint_every_s") or 0),
            log_every=int(t.log_every),
            grad_clip=float(t.grad_clip),
            time_budget=t.time_budget,
            monitor_every=int(ev.every),
            plots=bool(ev.plots),
            embedding=(int(ev.embedding_points), int(ev.batch_size), int(t.seed)),
            data=str(cfg.data.name),
        )


@dataclasses.dataclass
class Built:
    """Everything a run needs, built from its config."""

    settings: Settings
    runtime: Runtime
    data: ImageData
    augment: Augment
    training: Training
    monitor: KnnMonitor | None  # rank 0, labelled data and eval.every > 0 only
    evaluation: Evaluation
    encoder_metadata: dict[str, str]  # what encoder.safetensors carries
    starting: dict | None = None  # the starting weights' record (source, SHA-256), if any
    # rank 0, eval.every > 0 and a label-free metric in eval.metrics only
    labelfree_monitor: LabelFreeMonitor | None = None


def build_run(cfg: DictConfig, dist: Dist = SINGLE, data: ImageData | None = None) -> Built:
    """The run ``cfg`` describes, built: seeded, on its device, data loaded and checked;
    ``data`` replaces the config's source (benchmarks that fall back to other images when a
    dataset is not installed)."""
    t = cfg.trainer
    seed_everything(t.seed, t.deterministic)
    runtime: Runtime = build(cfg.device)
    if dist.several and runtime.device.type == "cuda":  # one GPU per process on its node
        runtime = dataclasses.replace(runtime, device=torch.device("cuda", dist.local_rank))
        torch.cuda.set_device(runtime.device)
    data = load_data(cfg) if data is None else data
    check_data(cfg, data)
    augment = build(cfg.data.augment)
    encoder = build_encoder(cfg, t.seed)
    starting = starting_weights(cfg, encoder)
    if starting is not None:  # before the method copies it (EMA targets) or wraps it
        log.info(f"encoder: starting weights from {starting.source}")
        starting.load_into(encoder)
    training = build_training(cfg, runtime, data, encoder, dist)
    monitor = None
    labelled = data.train is not None and data.train.labels is not None
    if dist.main and labelled and cfg.eval.every > 0:
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
    evaluation = evaluation_of(cfg, data, runtime, int(t.seed), starting)
    labelfree_monitor = None
    if dist.main and cfg.eval.every > 0 and set(cfg.eval.metrics) & LABEL_FREE_METRICS:
        labelfree_monitor = LabelFreeMonitor(
            data.train.images if labelled else data.pretrain.images,
            augment,
            int(cfg.eval.get("labelfree_size", 2048)),
            runtime.device,
            cfg.eval.batch_size,
            runtime.channels_last,
            runtime.autocast,
        )
    return Built(
        Settings.of(cfg),
        runtime,
        data,
        augment,
        training,
        monitor,
        evaluation,
        encoder_metadata(cfg),
        starting.record() if starting is not None else None,
        labelfree_monitor=labelfree_monitor,
    )


LR_SCALINGS = {"none": lambda r: 1.0, "linear": lambda r: r, "sqrt": math.sqrt}


def lr_scale(cfg: DictConfig) -> float:
    """The factor ``optim.lr_scaling`` applies to the configured learning rates for the
    global batch: ``none`` (the rate is used as given), ``linear`` (x batch / reference,
    Goyal et al. 2017, for SGD) or ``sqrt`` (x sqrt(batch / reference), for Adam and LARS)."""
    return LR_SCALINGS[cfg.optim.lr_scaling](cfg.trainer.batch_size / cfg.optim.reference_batch)


def build_training(
    cfg: DictConfig,
    runtime: Runtime,
    data: ImageData,
    encoder: torch.nn.Module,
    dist: Dist = SINGLE,
) -> Training:
    """What ``train`` needs, built from ``cfg`` around ``encoder`` (also used by ``make bench``).

    With several processes: BatchNorm over the global batch (``trainer.sync_bn``), the
    method's forward wrapped in DDP, and batches of this process's share of each step."""
    t = cfg.trainer
    method = build(cfg.loss, encoder=encoder)
    if dist.several and t.sync_bn:
        method = convert_sync_batchnorm(method)
    method = method.to(runtime.device)
    if runtime.channels_last:
        method = method.to(memory_format=torch.channels_last)
    step_fn: Callable[..., torch.Tensor] = method
    if dist.several:
        # Synced BatchNorm keeps every buffer equal on every process; without it, rank 0's
        # running statistics are the ones kept (sent to the others every step). torch 2.14
        # renamed the switch; older releases (>= 2.10 is supported) only know the old name.
        sync = (
            "forward_sync_buffers"
            if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
            else "broadcast_buffers"
        )
        step_fn = DistributedDataParallel(
            method,
            device_ids=[runtime.device.index] if runtime.device.type == "cuda" else None,
            **{sync: not t.sync_bn},
        )
    if runtime.compile:
        step_fn = torch.compile(step_fn)
    optimizer = build(cfg.optim.optimizer)([p for p in method.parameters() if p.requires_grad])
    for group in optimizer.param_groups:
        group["lr"] *= lr_scale(cfg)
    try:
        batches = batches_of(
            data.pretrain,
            t.batch_size,
            t.seed,
            runtime.device,
            runtime.data_on_device,
            shard=dist.shard(t.batch_size),
        )
    except ValueError as e:
        raise ConfigError(str(e)) from None
    scheduler = build(cfg.optim.scheduler)(optimizer, steps_per_epoch=len(batches), epochs=t.epochs)
    return Training(method, step_fn, optimizer, scheduler, batches)


def train_steps(built: Built, steps: int, epochs: int, seed: int, dist: Dist = SINGLE) -> Progress:
    """The first ``steps`` optimizer steps of a built run's training, for an ``epochs``-long
    schedule, then stop (no files, no monitor): what the benchmarks time and the
    multi-process tests compare. Stops through the loop's own stop request."""
    progress = Progress()
    train(
        built.training,
        built.augment,
        built.runtime,
        epochs,
        seed,
        progress,
        [StopAfter(steps)],
        dist=dist,
    )
    return progress


class StopAfter(Callback):
    """Asks the loop to stop after ``steps`` optimizer steps."""

    def __init__(self, steps: int):
        self.steps = steps
        self.progress: Progress | None = None

    def run_start(self, loop: Loop) -> None:
        self.progress = loop.progress

    def wants_stop(self) -> bool:
        return self.progress is not None and self.progress.step >= self.steps - 1

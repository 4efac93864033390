"""One run, in named steps: build everything from the config, restore a checkpoint, train,
finish (export, evaluate, plot). ``RunFiles`` owns the run directory's files.

The CLI calls ``run_training``; tests call it too, with a composed config and a temp dir.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import inspect
import json
import logging
import math
import os
import random
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf, open_dict
from safetensors.torch import save_file
from torch.nn.parallel import DistributedDataParallel

from contrastive_cli import failures, writer
from contrastive_cli.baselines import BaselineCache, baseline_keys, cache_dir
from contrastive_cli.checkpoint import latest_valid_checkpoint, load_checkpoint, save_checkpoint
from contrastive_cli.config import build
from contrastive_cli.data.augment import Augment
from contrastive_cli.data.batches import Batches, derive_seed
from contrastive_cli.data.datasets import ImageData
from contrastive_cli.device import Runtime
from contrastive_cli.distributed import SINGLE, Dist, convert_sync_batchnorm
from contrastive_cli.errors import (
    CheckpointError,
    ConfigError,
    DataError,
    Diverged,
    Refused,
    RunExists,
    UserError,
)
from contrastive_cli.evaluate import (
    PROTOCOL_VERSION,
    KnnMonitor,
    evaluate_protocol,
    extract_features,
)
from contrastive_cli.report import MetricsLog, results_table, versions
from contrastive_cli.rundirs import Run
from contrastive_cli.schedule import set_total_steps
from contrastive_cli.signals import GracefulStop, Interrupted
from contrastive_cli.tracking import EmbeddingSample, Trackers, build_trackers
from contrastive_cli.train import Hooks, Progress, progress_from_state, train
from contrastive_cli.untrusted import printable
from contrastive_cli.validate import check_data, validate

log = logging.getLogger(__name__)
CHECKPOINT = Path("checkpoints") / "last.pt"


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
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
    """What encoder.safetensors carries so it can be rebuilt without its run directory
    (read back against a fixed schema: ``commands.eval.read_encoder_metadata``)."""
    return {
        "format": "contrast-encoder-v1",
        "encoder": json.dumps(OmegaConf.to_container(cfg.encoder, resolve=True)),
        "data": str(cfg.data.name),
        "channels": str(cfg.data.channels),
        "image_size": str(cfg.data.image_size),
        "seed": str(cfg.trainer.seed),
    }


# Settings that change what training computes. A checkpoint records their digest, and
# `contrast resume` refuses a config whose digest differs (where data lives, the device,
# logging and evaluation settings may change).
TRAINING_KEYS = (
    "encoder",
    "loss",
    "optim",
    "data.name",
    "data.channels",
    "data.image_size",
    "data.augment",
    "trainer.epochs",
    "trainer.batch_size",
    "trainer.seed",
    "trainer.grad_clip",
)


def training_config(resolved: dict[str, Any]) -> dict[str, Any]:
    """The TRAINING_KEYS of a resolved config (plain dict), by dotted key."""
    picked = {}
    for key in TRAINING_KEYS:
        node: Any = resolved
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        picked[key] = node
    return picked


def training_digest(resolved: dict[str, Any]) -> str:
    text = json.dumps(training_config(resolved), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


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


def embedding_sample(
    encoder: torch.nn.Module, data: ImageData, augment: Any, runtime: Runtime, cfg: DictConfig
) -> EmbeddingSample | None:
    """Up to ``eval.embedding_points`` test images (a fixed subset) and their features: what
    the embedding map and TensorBoard's projector show. None without labelled test images."""
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
    return EmbeddingSample(
        features.float().cpu(), data.test.labels[idx], data.test.images[idx], data.class_names
    )


def plot_embedding_of(
    encoder: torch.nn.Module,
    data: ImageData,
    augment: Any,
    runtime: Runtime,
    cfg: DictConfig,
    out: Path,
    title: str,
    sample: EmbeddingSample | None = None,
) -> Path | None:
    """The embedding map of ``sample`` (default: ``embedding_sample`` of the encoder)."""
    from contrastive_cli.plots import plot_embedding

    sample = sample or embedding_sample(encoder, data, augment, runtime, cfg)
    if sample is None:
        return None
    return plot_embedding(
        sample.features.numpy(),
        sample.labels.numpy(),
        out,
        title,
        cfg.trainer.seed,
        sample.class_names,
    )


def embedding_map(run: Run, out: Path) -> Path | None:
    """The embedding map of a finished run's encoder (rebuilt from its saved config)."""
    weights = run.path / "encoder.safetensors"
    if not weights.is_file():
        return None
    cfg = run.config()
    validate(cfg)
    runtime = build(cfg.device)
    data = load_data(cfg)
    encoder = load_trained_encoder(cfg, weights)
    title = f"{run.choices.get('loss', '')} on {cfg.data.name}"
    return plot_embedding_of(
        encoder.to(runtime.device), data, build(cfg.data.augment), runtime, cfg, out, title
    )


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; one CheckpointError line for a damaged file (bad
    header, sizes that do not match the data, not a safetensors file) or one that is not a
    regular file (a link, a FIFO)."""
    from safetensors.torch import load

    from contrastive_cli.untrusted import UntrustedFile, read_bytes, safetensors_header

    try:
        safetensors_header(path)
        return load(read_bytes(path, "weights", root=path.parent))
    except UntrustedFile as e:
        raise CheckpointError(str(e)) from None
    except Exception as e:  # SafetensorError and friends
        text = str(e).strip()
        reason = (text.splitlines()[0] if text else type(e).__name__)[:200]
        raise CheckpointError(f"{path} is not a readable safetensors file ({reason})") from None


def load_trained_encoder(cfg: DictConfig, path: Path) -> torch.nn.Module:
    """The encoder ``cfg`` builds, with the trained weights of ``path``. Its shapes are first
    compared, on the meta device (no memory), with the tensors the file's header declares,
    so an encoder config that does not fit the file (widths of a billion, from a forged
    config or metadata) is one line before anything is allocated."""
    from contrastive_cli.untrusted import UntrustedFile, safetensors_header

    try:
        shapes, _ = safetensors_header(path)
    except UntrustedFile as e:
        raise CheckpointError(str(e)) from None
    try:
        with torch.device("meta"):
            expected = {
                k: tuple(v.shape)
                for k, v in build_encoder(cfg, cfg.trainer.seed).state_dict().items()
            }
    except (RuntimeError, ValueError, TypeError, OverflowError, MemoryError) as e:
        raise CheckpointError(
            f"{path}: the encoder config cannot be built ({type(e).__name__})"
        ) from None
    if expected != shapes:
        missing = [k for k in expected if k not in shapes]
        wrong = [k for k in expected if k in shapes and expected[k] != shapes[k]]
        extra = [k for k in shapes if k not in expected]
        problem = (
            f"{missing[0]} is missing ({len(missing)} entries)"
            if missing
            else f"{wrong[0]} is {shapes[wrong[0]]}, the config builds {expected[wrong[0]]}"
            if wrong
            else f"{len(extra)} unexpected entries (e.g. {extra[0]})"
        )
        raise CheckpointError(f"{path} does not fit the run's config: {printable(problem)}")
    encoder = build_encoder(cfg, cfg.trainer.seed)
    load_weights(encoder, read_weights(path), path)
    return encoder


def load_weights(module: torch.nn.Module, state: dict[str, Any], source: Path) -> None:
    """``module.load_state_dict(state)``, with one CheckpointError line naming the first
    missing, unexpected or mis-shaped entry when ``state`` is not what the config builds."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [
        f"{k} is {tuple(v.shape)}, the config builds {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and (not isinstance(v, torch.Tensor) or v.shape != own[k].shape)
    ]
    problem = (
        f"{len(missing)} entries missing (e.g. {missing[0]})"
        if missing
        else f"{len(unexpected)} unexpected entries (e.g. {unexpected[0]})"
        if unexpected
        else wrong[0]
        if wrong
        else None
    )
    if problem is None:
        try:
            module.load_state_dict(state)
            return
        except (RuntimeError, TypeError, ValueError) as e:
            problem = str(e).strip().splitlines()[0]
    raise CheckpointError(f"{source} does not fit the run's config: {problem}")


class Training(NamedTuple):
    method: torch.nn.Module  # on the device; what checkpoints and exports hold
    step_fn: Callable[..., torch.Tensor]  # its forward: the method, DDP-wrapped, compiled
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    batches: Batches


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
        batches = data.pretrain.batches(
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


# --------------------------------------------------------------------------- the run directory
class RunFiles:
    """The run directory's files, written only through here: no write follows a symbolic
    link (see ``contrastive_cli.writer``), whole files are replaced atomically."""

    # Everything a run writes, checked for links before the run starts (not after training).
    NAMES = (
        "train.log",
        "metrics.jsonl",
        "results.json",
        "encoder.safetensors",
        "checkpoints/last.pt",
        "checkpoints/prev.pt",
        "plots/curves.png",
        "plots/embedding.png",
    )

    def __init__(self, path: Path, writes: bool = True):
        self.path = path
        self.writes = writes  # only one process of several writes the run directory
        for name in self.NAMES:
            writer.check_file(writer.safe_path(path, name, create=False))

    def file(self, relative: str | Path) -> Path:
        return writer.safe_path(self.path, relative, create=self.writes)

    @contextlib.contextmanager
    def logging_to_train_log(self) -> Iterator[None]:
        if not self.writes:
            yield
            return
        handler = writer.SafeFileHandler(self.file("train.log"))
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        logger = logging.getLogger("contrastive_cli")
        logger.setLevel(logging.INFO)
        logger.addHandler(handler)
        try:
            yield
        finally:
            logger.removeHandler(handler)
            handler.close()

    def metrics(self, keep_epochs: int) -> MetricsLog | None:
        return MetricsLog(self.file("metrics.jsonl"), keep_epochs) if self.writes else None

    def config(self, cfg: DictConfig) -> None:
        """Rewrite the saved config (resolved) with ``cfg``'s values."""
        if self.writes and (self.path / ".hydra" / "config.yaml").exists():
            from contrastive_cli.rebuild import saved_config

            writer.write_text_atomic(self.file(Path(".hydra") / "config.yaml"), saved_config(cfg))

    def results(self, results: dict[str, Any]) -> None:
        if self.writes:
            writer.write_json(self.file("results.json"), results)

    def read_status(self) -> str | None:
        from contrastive_cli.rundirs import read_results

        results, _ = read_results(self.path / "results.json")
        return None if results is None else results.get("status")

    def checkpoint(self) -> Path:
        return self.file(CHECKPOINT)

    def encoder(self, encoder: torch.nn.Module, metadata: dict[str, str]) -> None:
        path = self.file("encoder.safetensors")
        fd, tmp = tempfile.mkstemp(prefix=".encoder.", suffix=".tmp", dir=self.path)
        os.close(fd)
        try:
            tensors = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
            save_file(tensors, tmp, metadata=metadata)
            os.chmod(tmp, writer.FILE_MODE)
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


# --------------------------------------------------------------------------- the steps
@dataclasses.dataclass
class Built:
    """Everything a run needs, built from its config."""

    runtime: Runtime
    data: ImageData
    augment: Augment
    training: Training
    monitor: KnnMonitor | None


def build_run(cfg: DictConfig, dist: Dist = SINGLE, data: ImageData | None = None) -> Built:
    """Build a run from its config; ``data`` replaces the config's source (benchmarks that
    fall back to other images when a dataset is not installed)."""
    t = cfg.trainer
    seed_everything(t.seed, t.deterministic)
    runtime: Runtime = build(cfg.device)
    if dist.several and runtime.device.type == "cuda":  # one GPU per process on its node
        runtime = dataclasses.replace(runtime, device=torch.device("cuda", dist.local_rank))
        torch.cuda.set_device(runtime.device)
    data = load_data(cfg) if data is None else data
    check_data(cfg, data)
    augment = build(cfg.data.augment)
    training = build_training(cfg, runtime, data, build_encoder(cfg, t.seed), dist)
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
    return Built(runtime, data, augment, training, monitor)


def train_steps(built: Built, steps: int, epochs: int, seed: int, dist: Dist = SINGLE) -> Progress:
    """The first ``steps`` optimizer steps of a built run's training, for an ``epochs``-long
    schedule, then stop (no files, no monitor): what the benchmarks time and the
    multi-process tests compare. Stops through the loop's own stop request."""
    method, forward, optimizer, scheduler, batches = built.training
    progress = Progress()

    class _Done(Exception):
        pass

    hooks = Hooks(
        end_epoch=lambda p, r: None,
        save=lambda p: None,
        stop_requested=lambda: progress.step >= steps - 1,
        interrupted=lambda p: _Done(),
    )
    with contextlib.suppress(_Done):
        train(
            method,
            forward,
            optimizer,
            scheduler,
            batches,
            built.augment,
            built.runtime,
            epochs,
            seed,
            progress,
            hooks,
            dist=dist,
        )
    return progress


def restore(
    cfg: DictConfig, built: Built, files: RunFiles, resolved: dict
) -> tuple[Progress, float]:
    """The progress of the checkpoint to resume from (its state loaded into the method,
    optimizer and schedule) and the wall time the run had taken by then (earlier attempts),
    or a fresh start. Refuses, in one line, a checkpoint made for another training config
    and one whose contents do not fit what the config builds."""
    if not cfg.trainer.resume:
        return Progress(), 0.0
    path = latest_valid_checkpoint(files.checkpoint().parent)
    if path is None:
        return Progress(), 0.0
    state = load_checkpoint(path, map_location=built.runtime.device)
    _check_resumable(state, resolved, path)
    method, optimizer, scheduler = built.training[0], built.training[2], built.training[3]
    load_weights(method, state["method"], path)
    try:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        progress = progress_from_state(state["progress"])
        steps = len(built.training.batches)
        if progress.batch >= steps or progress.step != progress.epoch * steps + progress.batch:
            raise ValueError(
                f"its position (epoch {progress.epoch}, step {progress.step}, batch "
                f"{progress.batch}) does not fit {steps} steps per epoch"
            )
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        problem = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} does not fit the run's config: {problem}") from None
    # The epoch in progress, numbered as "stopped at epoch N" numbered it.
    log.info(
        f"resuming from {path}: epoch {progress.epoch + 1}/{cfg.trainer.epochs}, "
        f"step {progress.step}"
    )
    earlier = state.get("wall_time_s", progress.train_seconds)  # older checkpoints: a floor
    return progress, float(earlier) if isinstance(earlier, (int, float)) else 0.0


def _check_resumable(state: dict, resolved: dict, path: Path) -> None:
    """ConfigError (exit 2) when the checkpoint was made for other training settings."""
    for key in ("method", "optimizer", "scheduler", "progress"):
        if not isinstance(state.get(key), dict):
            raise CheckpointError(f"{path} does not fit the run's config: it has no {key} state")
    saved = state.get("config") if isinstance(state.get("config"), dict) else {}
    position = state["progress"].get("epoch")
    epochs = resolved["trainer"]["epochs"]
    if isinstance(position, int) and epochs < position:
        raise ConfigError(
            f"trainer.epochs={epochs} is not allowed: the checkpoint {path} is at epoch {position}; "
            f"allowed: {training_config(saved).get('trainer.epochs', position)} (what it was made "
            "for)"
        )
    digest = state.get("config_digest", training_digest(saved) if saved else None)
    if digest is not None and digest != training_digest(resolved):
        now, then = training_config(resolved), training_config(saved)
        changed = [k for k in TRAINING_KEYS if now.get(k) != then.get(k)] or ["(unknown)"]
        detail = (
            f"{changed[0]}={json.dumps(now.get(changed[0]))} (the checkpoint: "
            f"{json.dumps(then.get(changed[0]))})"
            if saved
            else changed[0]
        )
        raise ConfigError(
            f"cannot resume: the run's training config no longer matches its checkpoint {path}: "
            f"{detail}"[:400]
            + "; restore the run's .hydra/config.yaml, or start a new run"
        )


def check_resumable(cfg: DictConfig, run_dir: Path) -> None:
    """With ``trainer.resume``: Refused (one line) when the run's checkpoint was made for
    other training settings, checked before the run directory is locked, logged to or
    written, so that a refused resume changes nothing on disk (``restore`` checks again)."""
    if not cfg.trainer.resume or not (run_dir / CHECKPOINT.parent).is_dir():
        return
    try:
        path = latest_valid_checkpoint(run_dir / CHECKPOINT.parent)
        if path is not None:
            state = load_checkpoint(path, map_location="cpu")
            _check_resumable(state, OmegaConf.to_container(cfg, resolve=True), path)
    except (ConfigError, CheckpointError) as e:
        raise Refused(str(e), e.exit_code) from None


def run_training(
    cfg: DictConfig,
    run_dir: Path,
    choices: dict[str, str] | None = None,
    dist: Dist = SINGLE,
    lock: bool = True,
) -> dict[str, Any]:
    """Train and evaluate the run that ``cfg`` describes, in ``run_dir``. Returns results.json
    (on the main process; the others return an empty dict). ``lock``: hold the run
    directory's lock (a launcher of several processes holds it for them)."""
    started = time.time()
    validate(cfg)
    check_resumable(cfg, run_dir)  # before anything in run_dir is touched
    run_dir.mkdir(parents=True, exist_ok=True)
    files = RunFiles(run_dir, writes=dist.main)
    held = writer.lock(run_dir, "resume" if cfg.trainer.resume else "train")
    with held if lock else contextlib.nullcontext():
        if (
            dist.main
            and not cfg.trainer.resume
            and any((run_dir / f).exists() for f in ("results.json", str(CHECKPOINT.parent)))
        ):
            raise RunExists(
                f"run directory {run_dir} already holds a run; resume it with `contrast resume "
                f"{run_dir}` or choose a new directory"
            )
        with files.logging_to_train_log():
            return _tracked(cfg, files, choices or {}, started, dist)


def _tracked(
    cfg: DictConfig, files: RunFiles, choices: dict[str, str], started: float, dist: Dist
) -> dict[str, Any]:
    """The run, with its trackers (rank 0's) started first and told how it ended, on
    every way out: completed, interrupted, diverged or failed."""
    run_dir = files.path
    trackers, outcome = Trackers(), ("failed", {})
    try:
        trackers = build_trackers(cfg, rank=dist.rank)
        resolved = OmegaConf.to_container(cfg, resolve=True)
        trackers.start(run_dir, resolved, choices, bool(cfg.trainer.resume))
        stop = GracefulStop(run_dir / CHECKPOINT)
        with stop:
            results = _run(cfg, files, choices, started, stop, dist, trackers)
        outcome = ("completed", results)
        return results
    except Interrupted as e:
        if dist.main and files.read_status() != "interrupted":  # stopped outside the loop
            files.results({"status": "interrupted", "run_dir": str(run_dir), "error": str(e)})
            log.info(str(e))
        outcome = ("interrupted", _results_or(run_dir, {"error": str(e)}))
        raise
    except Diverged as e:
        outcome = ("diverged", _results_or(run_dir, {"error": str(e)}))
        raise
    except Exception as e:  # commands/train.py records the failure in results.json
        error = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
        outcome = ("failed", {"error": error})
        raise
    finally:
        trackers.finish(*outcome, run_dir)


def _results_or(run_dir: Path, default: dict[str, Any]) -> dict[str, Any]:
    """results.json of ``run_dir`` (what a stopped run wrote), else ``default``."""
    from contrastive_cli.rundirs import read_results

    results, _ = read_results(run_dir / "results.json")
    return results if results is not None else default


def _run(
    cfg: DictConfig,
    files: RunFiles,
    choices: dict[str, str],
    started: float,
    stop: GracefulStop,
    dist: Dist,
    trackers: Trackers,
) -> dict[str, Any]:
    t = cfg.trainer
    run_dir = files.path
    resolved = OmegaConf.to_container(cfg, resolve=True)
    built = build_run(cfg, dist)
    runtime, data, augment = built.runtime, built.data, built.augment
    method, step_fn, optimizer, scheduler, batches = built.training
    progress, earlier_s = restore(cfg, built, files, resolved)
    started -= earlier_s  # wall times count the earlier attempts, as train_time_s does
    metrics_log = files.metrics(keep_epochs=progress.epoch)
    digest = training_digest(resolved)

    def save(progress: Progress) -> None:
        if not dist.main:
            return
        save_checkpoint(
            files.checkpoint(),
            {
                "method": method.state_dict(),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "progress": dataclasses.asdict(progress),
                "config": resolved,
                "config_digest": digest,
                "wall_time_s": time.time() - started,  # this attempt and the earlier ones
            },
        )

    last_save = [time.monotonic()]  # when a checkpoint was last written (the start counts)

    def end_epoch(progress: Progress, record: dict) -> int | None:
        """Monitor, log and checkpoint (rank 0); the epoch count trainer.time_budget fixes."""
        nonlocal digest
        if built.monitor is not None and (
            progress.epoch % cfg.eval.every == 0 or progress.epoch == t.epochs
        ):
            record["knn"] = built.monitor(method.encoder)
        epochs = None
        warmup = record.pop("first_step_s", 0.0)  # for the budget only, not a logged metric
        if (budget := t.time_budget) is not None and progress.epoch == 1:
            first = time.time() - started_training  # training and monitoring
            steady = first - warmup + (record["epoch_time_s"] - warmup) / max(len(batches) - 1, 1)
            epochs = _fit_to_budget(budget, first, steady, dist)
            with open_dict(cfg):
                cfg.trainer.epochs, cfg.trainer.time_budget = epochs, None
            resolved.update(OmegaConf.to_container(cfg, resolve=True))  # and what follows epochs
            digest = training_digest(resolved)
            set_total_steps(scheduler, epochs * len(batches))
            summary["epochs"] = epochs
            if dist.main:  # what reproduce reruns: this many epochs, no budget to measure
                files.config(cfg)
                log.info(
                    f"trainer.time_budget={budget}: the first epoch took {first:.0f} s, so "
                    f"{epochs} epochs (now in .hydra/config.yaml)"
                )
        if not dist.main:  # one process monitors, logs and saves; the others train on
            return epochs
        assert metrics_log is not None
        metrics_log.append(record)
        trackers.log_epoch(record)
        left = (t.epochs - progress.epoch) * progress.train_seconds / max(progress.epoch, 1)
        log.info(
            f"epoch {record['epoch']}/{t.epochs}  step {record['step']}  loss {record['loss']:.4f}  "
            f"lr {record['lr']:.2e}  {record['images_per_s']:,.0f} img/s"
            + (f"  knn {record['knn']:.4f}" if "knn" in record else "")
            + (f"  ~{_duration(left)} of training left" if progress.epoch < t.epochs else "")
        )
        # A cadence bounds the bytes written (a 100-epoch digits run rewrote 7 MB 100 times);
        # a stop request saves on its own (train's hooks.save), the last epoch always.
        every = t.get("checkpoint_every_s") or 0
        if t.checkpoint and (
            progress.epoch >= t.epochs or time.monotonic() - last_save[0] >= every
        ):
            save(progress)
            last_save[0] = time.monotonic()
        return epochs

    summary: dict[str, Any] = {
        "run_dir": str(run_dir),
        "data": cfg.data.name,
        "encoder": choices.get("encoder"),
        "loss": choices.get("loss"),
        "epochs": t.epochs,
        "seed": t.seed,
        "device": runtime.describe(),
        "processes": dist.world_size,
        **failures.restarts_so_far(),  # an elastically restarted group's earlier failures
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

    processes = f" x {dist.world_size} processes" if dist.several else ""
    log.info(
        f"training {choices.get('loss', '')} on {cfg.data.name} ({len(data.pretrain)} images, "
        f"{len(batches)} steps/epoch) on {runtime.describe()}{processes}; run dir {run_dir}"
    )

    def interrupted(progress: Progress) -> Interrupted:
        message = (
            f"stopped at epoch {progress.epoch + 1}/{t.epochs}, step {progress.step}; "
            "checkpoint saved; "
            f"continue with: contrast resume {run_dir}"
        )
        files.results(stopped("interrupted", progress, message))
        log.info(message)
        return Interrupted(stop.signum or 2, message)

    hooks = Hooks(
        end_epoch=end_epoch,
        save=save,
        stop_requested=lambda: stop.requested,
        interrupted=interrupted,
        log_step=trackers.log_step,
    )
    stop.graceful = True
    started_training = time.time()
    try:
        progress = train(
            method,
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
            dist,
        )
    except Diverged as e:
        files.results(stopped("diverged", progress, str(e)))
        raise
    finally:
        stop.graceful = False
    if not dist.main:
        return {}
    assert metrics_log is not None
    return finish(
        cfg, built, files, choices, summary, progress, metrics_log.records(), started, trackers
    )


MAX_BUDGET_EPOCHS = 1_000_000  # what a time budget may fix, however fast an epoch is


def _fit_to_budget(budget: str | float, first_s: float, steady_s: float, dist: Dist) -> int:
    """How many epochs fit ``trainer.time_budget`` ('15m', '90s', '1h' or seconds): the first
    epoch took ``first_s`` (training and monitoring), each later one should take ``steady_s``
    (the first without its first step's compilation and warm-up, plus one ordinary step);
    the same number on every process."""
    from contrastive_cli.distributed import reduce_flags

    seconds = parse_duration(budget)
    fits = (seconds - first_s) / max(steady_s, 1e-3)  # an epoch is never timed below 1 ms
    epochs = 1 + int(min(max(fits, 0.0), MAX_BUDGET_EPOCHS - 1))  # finite, whatever the budget
    agreed = reduce_flags(torch.tensor([float(epochs) if dist.main else 0.0], dtype=torch.float64))
    return int(agreed.item())


def parse_duration(text: str | float) -> float:
    """'15m' -> 900.0, '90s' -> 90.0, '1.5h' -> 5400.0, 600 -> 600.0."""
    if isinstance(text, (int, float)):
        return float(text)
    value, unit = float(text[:-1]) if text[-1] in "smh" else float(text), text[-1]
    return value * {"s": 1, "m": 60, "h": 3600}.get(unit, 1)


def finish(
    cfg: DictConfig,
    built: Built,
    files: RunFiles,
    choices: dict[str, str],
    summary: dict[str, Any],
    progress: Progress,
    records: list[dict],
    started: float,
    trackers: Trackers,
) -> dict[str, Any]:
    """Export the encoder, evaluate it beside the baselines, plot, write results.json."""
    encoder = built.training.method.encoder
    files.encoder(encoder, encoder_metadata(cfg))
    results: dict[str, Any] = {
        "status": "completed",
        **summary,
        "steps": progress.step,
        "train_time_s": progress.train_seconds,
        "images_per_s": progress.step * cfg.trainer.batch_size / max(progress.train_seconds, 1e-9),
    }
    eval_start = time.perf_counter()
    if built.data.labelled:
        results["metrics"], results["baselines"], results["baselines_from_cache"] = (
            evaluate_encoder(
                cfg, encoder, built.data, built.augment, built.runtime, cfg.trainer.seed
            )
        )
    else:
        results["eval_skipped"] = "the data has no labels: k-NN and the linear probe are skipped"
        log.info(results["eval_skipped"])
    results["eval_time_s"] = time.perf_counter() - eval_start
    # One feature extraction for the embedding map and TensorBoard's projector.
    sample = None
    if cfg.eval.plots or trackers:
        log.info(
            f"embedding map: features of up to {cfg.eval.embedding_points:,} test images"
            + (", then t-SNE (or UMAP) and plots/" if cfg.eval.plots else "")
        )
        sample = embedding_sample(encoder, built.data, built.augment, built.runtime, cfg)
        trackers.log_embedding(sample, progress.step)
    if cfg.eval.plots:
        _plot_run(files, records, encoder, built, cfg, choices, sample)
    results["wall_time_s"] = time.time() - started
    results["versions"] = versions()
    files.results(results)
    if "metrics" in results:
        log.info("\n" + results_table(results))
    log.info(f"results: {files.path / 'results.json'}")
    return results


def _plot_run(
    files: RunFiles,
    records: list[dict],
    encoder: torch.nn.Module,
    built: Built,
    cfg: DictConfig,
    choices: dict,
    sample: EmbeddingSample | None,
) -> None:
    """plots/curves.png and plots/embedding.png; a failed plot is a warning, never a failed run."""
    from contrastive_cli.plots import plot_curves

    try:
        plot_curves([(files.path.name, records)], files.file(Path("plots") / "curves.png"))
        plot_embedding_of(
            encoder,
            built.data,
            built.augment,
            built.runtime,
            cfg,
            files.file(Path("plots") / "embedding.png"),
            f"{choices.get('loss', '')} on {cfg.data.name}",
            sample,
        )
    except Exception as e:
        log.warning(f"plots were not written: {type(e).__name__}: {e}")


def _duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return (
        f"{hours} h {minutes} min"
        if hours
        else f"{minutes} min {secs} s"
        if minutes
        else f"{secs} s"
    )

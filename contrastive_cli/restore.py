"""Resuming: the checkpoint to continue from, loaded into the built run, or a fresh start."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from contrastive_cli.checkpoint import latest_valid_checkpoint, load_checkpoint
from contrastive_cli.errors import CheckpointError, ConfigError, Refused
from contrastive_cli.events import Progress, progress_from_state
from contrastive_cli.record import TRAINING_KEYS, training_config, training_digest
from contrastive_cli.runfiles import CHECKPOINT, RunFiles
from contrastive_cli.train import Training
from contrastive_cli.weights import load_weights

log = logging.getLogger(__name__)


def restore(
    training: Training, device: torch.device, files: RunFiles, resolved: dict, epochs: int
) -> tuple[Progress, float]:
    """The progress of the checkpoint to resume from (its state loaded into the method,
    optimizer and schedule), or a fresh start when there is none. Refuses, in one line, a
    checkpoint made for another training config (``resolved``: the run's) and one whose
    contents do not fit what the config builds. Also returns the wall time the run had taken
    by then (earlier attempts)."""
    path = latest_valid_checkpoint(files.checkpoint().parent)
    if path is None:
        return Progress(), 0.0
    state = load_checkpoint(path, map_location=device)
    _check_resumable(state, resolved, path)
    method, optimizer, scheduler = training.method, training.optimizer, training.scheduler
    load_weights(method, state["method"], path)
    try:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        progress = progress_from_state(state["progress"])
        steps = len(training.batches)
        if progress.batch >= steps or progress.step != progress.epoch * steps + progress.batch:
            raise ValueError(
                f"its position (epoch {progress.epoch}, step {progress.step}, batch "
                f"{progress.batch}) does not fit {steps} steps per epoch"
            )
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        problem = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} does not fit the run's config: {problem}") from None
    # The epoch in progress, numbered as "stopped at epoch N" numbered it.
    log.info(f"resuming from {path}: epoch {progress.epoch + 1}/{epochs}, step {progress.step}")
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

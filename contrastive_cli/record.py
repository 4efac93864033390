"""The config as a run records it: in every checkpoint (with the digest of its training
settings, which ``resume`` compares) and in .hydra/config.yaml (what ``reproduce`` reruns).

It starts as the user's config and changes once at most: when ``trainer.time_budget`` fixes
the epoch count. The user's config object is never changed: the record is a copy."""

from __future__ import annotations

import copy
import hashlib
import json
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

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


# encoder.weights, .strict, .pretrained (contrastive_cli.starting) and their defaults
STARTING_DEFAULTS = {"weights": None, "strict": True, "pretrained": False}


def training_config(resolved: dict[str, Any]) -> dict[str, Any]:
    """The TRAINING_KEYS of a resolved config (plain dict), by dotted key."""
    picked = {}
    for key in TRAINING_KEYS:
        node: Any = resolved
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        picked[key] = node
    encoder = picked.get("encoder")
    if isinstance(encoder, dict):  # starting keys at their defaults: the digest of a run
        # from before they existed, so that such a run still resumes
        picked["encoder"] = {
            k: v for k, v in encoder.items() if STARTING_DEFAULTS.get(k, object()) is not v
        }
    return picked


def training_digest(resolved: dict[str, Any]) -> str:
    text = json.dumps(training_config(resolved), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


class ConfigRecord:
    """The resolved config a checkpoint holds, its training digest, the epoch count, and
    the starting weights' record (``encoder.weights``: the file's SHA-256)."""

    def __init__(self, cfg: DictConfig, starting: dict[str, Any] | None = None):
        self._cfg = cfg  # never changed; copied when the record changes
        self.starting = starting  # the starting weights' source and SHA-256 (resume checks)
        self.resolved: dict[str, Any] = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
        self.digest = training_digest(self.resolved)

    @property
    def epochs(self) -> int:
        return int(self.resolved["trainer"]["epochs"])

    def fix_epochs(self, epochs: int) -> DictConfig:
        """The record after a time budget: ``epochs`` epochs and no budget to measure. Returns
        the config to save as the run's (interpolations kept where they were)."""
        saved = copy.deepcopy(self._cfg)
        with open_dict(saved):
            saved.trainer.epochs, saved.trainer.time_budget = epochs, None
        # Re-resolved: values that follow trainer.epochs (swav's loss.epochs) follow it here.
        self.resolved = {**self.resolved, **OmegaConf.to_container(saved, resolve=True)}  # type: ignore[dict-item]
        self.digest = training_digest(self.resolved)
        return saved

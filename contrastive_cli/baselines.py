"""Baseline results cached across runs.

The raw-pixel and random-init baselines do not depend on training: on Fashion-MNIST they
cost ~40 s and ~15 s of every run's evaluation. A result is stored under a digest of
everything its number depends on: the train/test images and labels, the evaluation settings
(k-NN k and T, probe settings, the seed that splits the probe's held-out part), the
protocol version (``evaluate.PROTOCOL_VERSION``) and a digest of the package's source (a
changed line of code never reads a stale number), torch's version and the device type; for
the random-init encoder also the resolved encoder config, its seed, the image shape and
normalisation, the feature batch size and the device's precision settings.

Files: ``$CONTRAST_CACHE/baselines/<name>-<digest>.json`` (default cache root
``$XDG_CACHE_HOME/contrast``, else ``~/.cache/contrast``), each holding its key, so a read
checks it. Written atomically. A damaged entry is recomputed with a warning; a cache folder
that cannot be written is a warning. Neither ever fails a run.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import Tensor

from contrastive_cli.evaluators.retrieval import QUERIES
from contrastive_cli.report import write_json

log = logging.getLogger(__name__)
FORMAT = "contrast-baseline-v1"


def cache_dir() -> Path:
    """Where baseline results live: ``$CONTRAST_CACHE/baselines``, else the XDG cache."""
    root = os.environ.get("CONTRAST_CACHE")
    if root:
        return Path(root).expanduser() / "baselines"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "contrast" / "baselines"


@functools.cache
def code_digest() -> str:
    """sha256 of the package's Python source: any change to the code that computes a
    baseline (the protocol, the encoders, normalisation, the probe's split) misses the cache,
    also where ``PROTOCOL_VERSION`` was not bumped."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def digest_images(images: Any, labels: Tensor | None) -> str | None:
    """sha256 of a split: tensor bytes, or for image files their paths, sizes and mtimes (a
    changed file changes the digest). None for anything else: that split is not cached."""
    h = hashlib.sha256()
    if isinstance(images, Tensor):
        array = images.detach().cpu().contiguous().numpy()
        h.update(f"{array.dtype}{array.shape}".encode())
        h.update(memoryview(array).cast("B"))
    elif hasattr(images, "paths"):
        h.update(f"files{tuple(images.shape)}".encode())
        for path in images.paths:
            try:
                st = os.stat(path)
            except OSError:
                return None
            # The name's bytes (os.fsencode): a non-UTF-8 file name is a surrogate in the str
            h.update(os.fsencode(os.path.abspath(path)))
            h.update(f"\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    else:
        return None
    if labels is not None:
        array = np.ascontiguousarray(labels.detach().cpu().numpy())
        h.update(f"labels{array.dtype}{array.shape}".encode())
        h.update(memoryview(array).cast("B"))
    return h.hexdigest()


class BaselineCache:
    """get/put of one baseline's metrics by key (a JSON-able dict)."""

    def __init__(self, directory: Path):
        self.directory = directory

    @staticmethod
    def _digest(key: dict[str, Any]) -> str:
        return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:40]

    def path(self, name: str, key: dict[str, Any]) -> Path:
        return self.directory / f"{name}-{self._digest(key)}.json"

    def get(self, name: str, key: dict[str, Any]) -> dict[str, float] | None:
        """The stored metrics, or None (missing; a damaged entry also warns)."""
        path = self.path(name, key)
        try:
            text = path.read_text()
        except FileNotFoundError:
            return None
        except OSError as e:
            log.warning(f"warning: baseline cache entry {path} is unreadable ({e}); recomputing")
            return None
        try:
            entry = json.loads(text)
            metrics = entry["metrics"]
            ok = (
                entry.get("format") == FORMAT
                and entry.get("key") == json.loads(json.dumps(key))
                and isinstance(metrics, dict)
                and all(
                    isinstance(v, int | float) and not isinstance(v, bool) for v in metrics.values()
                )
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            ok = False
        if not ok:
            log.warning(f"warning: baseline cache entry {path} is damaged; recomputing")
            return None
        return {k: float(v) for k, v in metrics.items()}

    def put(self, name: str, key: dict[str, Any], metrics: dict[str, float]) -> None:
        """Store ``metrics``; a folder that cannot be written is a warning."""
        path = self.path(name, key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_json(path, {"format": FORMAT, "baseline": name, "key": key, "metrics": metrics})
        except OSError as e:
            log.warning(f"warning: cannot write the baseline cache in {path.parent} ({e})")


def baseline_keys(
    cfg: Any,
    data: Any,
    runtime: Any,
    seed: int,
    encoder_config: dict[str, Any],
    protocol_version: int,
) -> dict[str, dict[str, Any]] | None:
    """{"raw_pixels": key, "random_init": key}, or None when a split cannot be digested."""
    splits = {}
    for name, split in (("train", data.train), ("test", data.test)):
        digest = digest_images(split.images, split.labels)
        if digest is None:
            return None
        splits[name] = digest
    ev = cfg.eval
    common = {
        "protocol": protocol_version,
        "code": code_digest(),
        "images": splits,
        "num_classes": int(data.num_classes),
        "metrics": [str(m) for m in ev.metrics],  # the evaluators that ran
        "knn_k": [int(k) for k in ev.knn_k],
        "knn_temperature": float(ev.knn_temperature),
        "probe": OmegaConf.to_container(ev.probe, resolve=True),
        # low-shot, retrieval and the label-free sample (alignment: the augmentation's views)
        "lowshot": [float(f) for f in ev.get("lowshot", [])],
        "lowshot_draws": int(ev.get("lowshot_draws", 3)),
        "lowshot_weight_decays": [float(w) for w in ev.get("lowshot_weight_decays", [])],
        "retrieval_queries": ev.get("retrieval_queries", QUERIES),
        "labelfree_size": int(ev.get("labelfree_size", 2048)),
        # the views' normalisation is undone for raw pixels; random_init keys it below
        "augment": {
            k: v
            for k, v in OmegaConf.to_container(cfg.data.augment, resolve=True).items()
            if k not in ("mean", "std")
        },
        "seed": int(seed),
        "torch": torch.__version__,
        "device": runtime.device.type,
    }
    random_init = {
        **common,
        "encoder": encoder_config,
        "channels": int(cfg.data.channels),
        "image_size": int(cfg.data.image_size),
        "normalize": {  # the features' input: augment.normalize (no other augmentation)
            "mean": [float(v) for v in cfg.data.augment.mean],
            "std": [float(v) for v in cfg.data.augment.std],
        },
        "batch_size": int(ev.batch_size),
        "autocast_bf16": bool(runtime.autocast),
        "channels_last": bool(runtime.channels_last),
    }
    return {"raw_pixels": common, "random_init": random_init}

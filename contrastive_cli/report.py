"""What a run writes and prints: metrics.jsonl, results.json, the results table, versions."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import torch

import contrastive_cli
from contrastive_cli.tables import knn_keys

LINEAR_LABELS = {"linear_top1": "linear", "linear_top5": "linear top-5"}
# The process's umask, read once at import (os.umask can only be read by setting it, which
# must not race with files other threads create).
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def metric_label(key: str) -> str:
    """knn_k50 -> 'k-NN k=50', linear_top1 -> 'linear'."""
    if key.startswith("knn_k"):
        return f"k-NN k={key.removeprefix('knn_k')}"
    return LINEAR_LABELS.get(key, key)


def write_json(path: Path, data: Any) -> None:
    """Write JSON atomically (temp file + rename), so readers never see half a file. The file
    gets the permissions of any other output (0644 under the usual umask), not mkstemp's 0600,
    and a failed write leaves no temp file behind."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), 0o666 & ~_UMASK)
            json.dump(data, f, indent=2, sort_keys=False)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


class MetricsLog:
    """metrics.jsonl: one JSON line per completed epoch.

    On resume the file is cut back to the checkpoint's epoch, so a resumed run's file
    equals an uninterrupted run's.
    """

    def __init__(self, path: Path, keep_epochs: int = 0):
        self.path = path
        lines = []
        if keep_epochs > 0 and path.exists():
            lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
            lines = [ln for ln in lines if json.loads(ln)["epoch"] <= keep_epochs]
        path.write_text("".join(ln + "\n" for ln in lines))

    def append(self, record: dict) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()

    def records(self) -> list[dict]:
        return [json.loads(ln) for ln in self.path.read_text().splitlines() if ln.strip()]


def versions() -> dict[str, str | None]:
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": _version_of("torchvision"),
        "hydra": _version_of("hydra"),
        "contrast": contrastive_cli.__version__,
        "git_sha": _git_sha(),
    }


def _version_of(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except Exception:
        return None


def _git_sha() -> str | None:
    """The checkout's commit (with '-dirty' for local changes); None when installed from a wheel."""
    repo = Path(contrastive_cli.__file__).resolve().parent.parent
    if not (repo / ".git").exists():
        return None
    try:
        sha = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def results_table(results: dict) -> str:
    """The table printed at the end of a run: trained encoder beside its baselines."""
    metrics = results.get("metrics") or {}
    baselines = results.get("baselines") or {}
    keys = knn_keys(metrics) + [k for k in LINEAR_LABELS if k in metrics]
    title = f"{results.get('loss', '?')} encoder"
    rows = [
        ("raw pixels", baselines.get("raw_pixels")),
        ("random init encoder", baselines.get("random_init")),
        (title, metrics),
    ]
    rows = [(name, m) for name, m in rows if m]
    width = max(len(name) for name, _ in rows)
    header = " " * width + "".join(f"  {metric_label(k):>12}" for k in keys)
    lines = [header]
    for name, m in rows:
        lines.append(
            f"{name:<{width}}"
            + "".join(f"  {m[k]:>12.4f}" if k in m else f"  {'-':>12}" for k in keys)
        )
    best = {k: max((b[k] for b in baselines.values() if b and k in b), default=None) for k in keys}
    if any(v is not None for v in best.values()) and metrics:
        lines.append(
            f"{'gain over best baseline':<{width}}"
            + "".join(
                f"  {metrics[k] - best[k]:>+12.4f}" if best[k] is not None else f"  {'':>12}"
                for k in keys
            )
        )
    return "\n".join(lines)

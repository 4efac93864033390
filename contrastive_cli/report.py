"""What a run writes and prints: metrics.jsonl, results.json, the results table, versions."""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
from pathlib import Path
from typing import Any

import torch

import contrastive_cli
from contrastive_cli.writer import open_append, write_json, write_text_atomic

__all__ = [
    "MetricsLog",
    "knn_keys",
    "metric_label",
    "read_metrics",
    "results_table",
    "versions",
    "write_json",
]

NOT_IN_TABLE = {
    "probe_weight_decay",
    "seconds",
    "finetune_lr",
    "finetune_scratch_lr",
}  # in results.json, not accuracies
LINEAR_LABELS = {"linear_top1": "linear", "linear_top5": "linear top-5"}
LABELS = {
    **LINEAR_LABELS,
    "recall_at_1": "R@1",
    "recall_at_5": "R@5",
    "map_at_r": "MAP@R",
    "finetune_top1": "fine-tune",
    "finetune_scratch_top1": "from scratch",
    "rankme": "RankMe",
    "rankme_projector": "RankMe proj.",
}
LABEL_FREE_KEYS = {"rankme", "rankme_projector", "alignment", "uniformity"}
# results.json's baselines, as the table names them (in results.json's order)
BASELINE_LABELS = {
    "raw_pixels": "raw pixels",
    "random_init": "random init encoder",
    "pretrained": "pretrained (as loaded)",
}


def knn_keys(metrics: dict[str, Any]) -> list[str]:
    """The k-NN keys of a results.json ``metrics`` in ``eval.knn_k`` order (headline first).
    Here, below ``tables`` and ``rundirs``, so that all three import it without a cycle."""
    return [k for k in metrics if re.fullmatch(r"knn_k\d+", k)]


def metric_label(key: str) -> str:
    """knn_k50 -> 'k-NN k=50', linear_top1 -> 'linear', lowshot_1pct -> '1% labels'."""
    if key.startswith("knn_k"):
        return f"k-NN k={key.removeprefix('knn_k')}"
    if m := re.fullmatch(r"lowshot_(.+)pct", key):
        return f"{m.group(1)}% labels"
    return LABELS.get(key, key)


class MetricsLog:
    """metrics.jsonl: one JSON line per completed epoch.

    Each line is appended with one ``write`` to a descriptor that refuses a symbolic link.
    On resume the file is cut back to the checkpoint's epoch by an atomic rewrite, so a
    resumed run's file equals an uninterrupted run's, and a partial last line (what kill -9
    or a full disk leaves) is dropped then.
    """

    def __init__(self, path: Path, keep_epochs: int = 0):
        self.path = path
        records = read_metrics(path) if keep_epochs > 0 and path.exists() else []
        kept = [r for r in records if r.get("epoch", 0) <= keep_epochs]
        write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))

    def append(self, record: dict) -> None:
        fd = open_append(self.path)
        try:
            os.write(fd, (json.dumps(record) + "\n").encode())
        finally:
            os.close(fd)

    def records(self) -> list[dict]:
        return read_metrics(self.path)


def read_metrics(path: Path, root: Path | None = None) -> list[dict]:
    """The records of a metrics.jsonl, read through ``contrastive_cli.untrusted`` (a regular
    file of bounded size, never a link, FIFO or device; finite numbers). A last line cut short
    is ignored (the run was killed while writing it); any other line that is not an epoch
    record is a one-line error. ``root``: the run directory (no link below it is followed)."""
    from contrastive_cli.untrusted import MAX_LINE, UntrustedFile, parse_json, read_bytes

    data = read_bytes(path, "metrics", root or path.parent)  # refusals: one line, exit 2
    lines = data.decode(errors="replace").splitlines()
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        if len(line) > MAX_LINE:
            raise UntrustedFile(
                f"{path} line {i + 1} is {len(line):,} characters; allowed: at most {MAX_LINE:,} "
                "(an epoch record is a few hundred)"
            )
        try:
            record = parse_json(line, f"{path} line {i + 1}")
        except UntrustedFile as e:
            if i == len(lines) - 1 and "not valid JSON" in str(e):
                break
            raise UntrustedFile(f"{e} (the file is damaged)") from None
        if not isinstance(record, dict) or not isinstance(record.get("epoch"), int):
            raise UntrustedFile(f"{path} line {i + 1} is not an epoch record (the file is damaged)")
        records.append(record)
    return records


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
    """The table printed at the end of a run: trained encoder beside its baselines; the
    accuracies (with the gain over the best baseline) first, then the label-free metrics."""
    metrics = results.get("metrics") or {}
    baselines = results.get("baselines") or {}
    title = f"{results.get('loss', '?')} encoder"
    rows = [(BASELINE_LABELS.get(name, name), m) for name, m in baselines.items()]
    rows.append((title, metrics))
    rows = [(name, m) for name, m in rows if m]
    keys = table_keys([m for _, m in rows])
    blocks = []
    accuracies = [k for k in keys if k not in LABEL_FREE_KEYS]
    if accuracies:
        blocks.append(_block(rows, accuracies, metrics, baselines, gain=True))
    labelfree = [k for k in keys if k in LABEL_FREE_KEYS]
    if labelfree:
        blocks.append(
            "label-free (RankMe: higher uses more dimensions; alignment, uniformity: lower is "
            "better; collapsed: 1, 0, 0)\n"
            + _block(rows, labelfree, metrics, baselines, gain=False)
        )
    split = str(results.get("split") or "")
    if split.startswith("heldout"):  # `contrast eval --heldout`: not a test-split result
        blocks.insert(0, f"held-out (train): {split}, not the test split")
    return "\n\n".join(blocks)


def table_keys(rows: list[dict[str, Any]]) -> list[str]:
    """The metric keys the rows hold, in table order: k-NN, linear, then what other
    evaluators returned, in their order (a low-shot ``_std`` rides in its mean's cell)."""
    seen = list(dict.fromkeys(k for m in rows for k in m))
    keys = knn_keys(dict.fromkeys(seen)) + [k for k in LINEAR_LABELS if k in seen]
    keys += [
        k
        for k in seen
        if k not in keys
        and k not in NOT_IN_TABLE
        and not k.endswith("_std")
        and all(isinstance(m.get(k, 0.0), (int, float)) for m in rows)
    ]
    return keys


def _block(
    rows: list[tuple[str, dict]], keys: list[str], metrics: dict, baselines: dict, gain: bool
) -> str:
    label = "gain over best baseline"
    width = max(len(name) for name in [label, *(name for name, _ in rows)])
    cell = max(
        12,
        *(len(metric_label(k)) for k in keys),
        *(len(_value(m, k)) for _, m in rows for k in keys),
    )
    lines = [" " * width + "".join(f"  {metric_label(k):>{cell}}" for k in keys)]
    for name, m in rows:
        lines.append(f"{name:<{width}}" + "".join(f"  {_value(m, k):>{cell}}" for k in keys))
    best = {k: max((b[k] for b in baselines.values() if b and k in b), default=None) for k in keys}
    if gain and any(v is not None for v in best.values()) and metrics:
        lines.append(
            f"{label:<{width}}"
            + "".join(
                f"  {metrics[k] - best[k]:>+{cell}.4f}"
                if best[k] is not None and k in metrics
                else f"  {'':>{cell}}"
                for k in keys
            )
        )
    return "\n".join(lines)


def _value(m: dict, key: str) -> str:
    if key not in m:
        return "-"
    if f"{key}_std" in m:  # low-shot: mean +- std over the draws
        return f"{m[key]:.4f}+-{m[f'{key}_std']:.3f}"
    if key.startswith("rankme"):
        return f"{m[key]:.2f}"
    return f"{m[key]:.4f}"

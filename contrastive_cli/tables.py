"""Tables of runs: one row per run directory, shared by `contrast runs` and sweep summaries."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from typing import Any

from omegaconf import OmegaConf

from contrastive_cli.errors import UserError
from contrastive_cli.rundirs import Run

COLUMNS = [
    "date",
    "data",
    "encoder",
    "loss",
    "overrides",
    "epochs",
    "knn",
    "knn20",
    "linear",
    "wall_s",
    "status",
    "path",
]
METRIC_COLUMNS = {"knn": "knn_k200", "knn20": "knn_k20", "linear": "linear_top1"}
NUMERIC = {"epochs", "knn", "knn20", "linear", "wall_s"}


def run_row(run: Run) -> dict[str, Any]:
    results = run.results or {}
    metrics = results.get("metrics") or {}
    group_choices = {f"{group}={option}" for group, option in run.choices.items()}
    overrides = [o for o in run.overrides if o not in group_choices and not o.startswith("hydra")]
    row: dict[str, Any] = {
        "date": run.started.strftime("%Y-%m-%d %H:%M:%S"),
        "data": run.choices.get("data", results.get("data", "")),
        "encoder": run.choices.get("encoder", results.get("encoder", "")),
        "loss": run.choices.get("loss", results.get("loss", "")),
        "overrides": " ".join(overrides),
        "epochs": results.get("epochs"),
        "wall_s": round(results["wall_time_s"], 1) if "wall_time_s" in results else None,
        "status": run.status,
        "path": str(run.path),
    }
    for column, key in METRIC_COLUMNS.items():
        row[column] = metrics.get(key)
    if results.get("error") and run.status != "completed":
        row["error"] = results["error"]
    if run.problem:
        row["error"] = run.problem
    return row


def matches(run: Run, row: dict[str, Any], condition: str) -> bool:
    """``key=value``: a column (loss=moco) or a dotted config key (optim.optimizer.lr=0.001)."""
    key, _, wanted = condition.partition("=")
    if key in row:
        actual = row[key]
    else:
        try:
            actual = OmegaConf.select(run.config(), key, default=None)
        except UserError:  # an unreadable config matches no condition on its keys
            return False
    return _same(actual, wanted)


def _same(actual: Any, wanted: str) -> bool:
    if actual is None:
        return wanted.lower() in ("", "none", "null")
    try:
        return float(actual) == float(wanted)
    except (TypeError, ValueError):
        return str(actual) == wanted


def sort_rows(rows: list[dict[str, Any]], key: str, reverse: bool = False) -> list[dict[str, Any]]:
    """Metrics sort best first; other columns ascending. Missing values go last."""
    descending = key in METRIC_COLUMNS
    present = [r for r in rows if r.get(key) is not None]
    missing = [r for r in rows if r.get(key) is None]
    present.sort(key=lambda r: r[key], reverse=descending != reverse)
    return present + missing


def _cell(value: Any, column: str) -> str:
    if value is None:
        return "-"
    if column in ("knn", "knn20", "linear"):
        return f"{value:.4f}"
    return str(value)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] = COLUMNS) -> str:
    if not rows:
        return "(no runs)"
    cells = [[_cell(r.get(c), c) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    align = [(str.rjust if c in NUMERIC else str.ljust) for c in columns]
    lines = ["  ".join(a(c, w) for a, c, w in zip(align, columns, widths, strict=True)).rstrip()]
    lines += [
        "  ".join(a(v, w) for a, v, w in zip(align, row, widths, strict=True)).rstrip()
        for row in cells
    ]
    failures = [r for r in rows if r.get("error")]
    for r in failures:
        lines.append(f"  {r['status']}: {r['path']}: {r['error']}")
    return "\n".join(lines)


def to_csv(rows: Sequence[dict[str, Any]], columns: Sequence[str] = (*COLUMNS, "error")) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: row.get(c) for c in columns})
    return buffer.getvalue()

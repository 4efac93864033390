"""Tables of runs: one row per run directory, shared by `contrast runs` and sweep summaries.

The metric columns follow what the runs computed: k-NN columns follow each run's
``eval.knn_k`` (``knn`` is the headline accuracy, the first k, what sweepers optimise, and
every other k gets a column ``knn<k>``, ``knn20`` by default), ``linear`` is the probe's top-1,
and every other metric of results.json (``lowshot_1pct``, ``recall_at_1``, ``map_at_r``,
``finetune_top1``, ``rankme``, ``alignment``, ``uniformity``, ...) gets a column of its key
after ``linear``. A metric column that no run has is left out.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Sequence
from typing import Any

from omegaconf import OmegaConf

from contrastive_cli.errors import UserError
from contrastive_cli.report import knn_keys
from contrastive_cli.rundirs import Run
from contrastive_cli.untrusted import printable

COLUMNS = [
    "date",
    "data",
    "encoder",
    "loss",
    "overrides",
    "epochs",
    "knn",
    "linear",
    "wall_s",
    "status",
    "path",
]  # plus knn<k> after knn for each k-NN but the first that the runs measured
METRIC_COLUMNS = ("knn", "linear")
EXTRA_KNN = re.compile(r"knn(\d+)")  # knn20: the k-NN accuracy with k=20
# the other metrics' columns: their results.json keys
EXTRA_METRIC = re.compile(
    r"lowshot_[\d.]+pct|recall_at_\d+|map_at_r|finetune(_scratch)?_top1|rankme(_projector)?|alignment|uniformity"
)
LOWER_IS_BETTER = {"alignment", "uniformity"}  # sorted ascending: best first
NUMERIC = {"epochs", "wall_s"}


def is_metric(column: str) -> bool:
    return (
        column in METRIC_COLUMNS
        or EXTRA_KNN.fullmatch(column) is not None
        or EXTRA_METRIC.fullmatch(column) is not None
    )


def is_column(column: str) -> bool:
    """A column of `contrast runs`: one of COLUMNS, a k-NN column knn<k> or another metric."""
    return column in COLUMNS or is_metric(column)


def with_knn_columns(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> list[str]:
    """``columns`` with the rows' other k-NN columns (knn<k>, first seen first) after knn and
    their other metric columns after linear; a metric column no row has is left out."""
    seen = list(dict.fromkeys(k for r in rows for k, v in r.items() if v is not None))
    extra = [k for k in seen if EXTRA_KNN.fullmatch(k)]
    others = [k for k in seen if EXTRA_METRIC.fullmatch(k)]
    out: list[str] = []
    for c in columns:
        if c in METRIC_COLUMNS and c not in seen:
            c_list: list[str] = []
        else:
            c_list = [c]
        if c == "knn":
            c_list += extra
        if c == "linear":
            c_list += others
        out += c_list
    return out


def run_row(run: Run) -> dict[str, Any]:
    results = run.results or {}
    metrics = results.get("metrics") or {}
    group_choices = {f"{group}={option}" for group, option in run.choices.items()}
    overrides = [  # tracker=... says where the run was logged, not what it did
        o
        for o in run.overrides
        if o not in group_choices and not o.lstrip("+~").startswith(("hydra", "tracker"))
    ]
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
    knn = knn_keys(metrics)
    row["knn"] = metrics[knn[0]] if knn else None
    for key in knn[1:]:
        row[f"knn{key.removeprefix('knn_k')}"] = metrics[key]
    row["linear"] = metrics.get("linear_top1")
    for key, value in metrics.items():  # the other evaluators' metrics, by their keys
        if EXTRA_METRIC.fullmatch(key) and isinstance(value, int | float):
            row[key] = value
    if results.get("error") and run.status != "completed":
        row["error"] = results["error"]
    if run.problem:
        row["error"] = run.problem
    # Every string came from files someone else may have written: no escape sequence,
    # carriage return or bidi override reaches the terminal (or a CSV shown on one).
    return {k: printable(v) if isinstance(v, str) else v for k, v in row.items()}


def matches(run: Run, row: dict[str, Any], condition: str) -> bool:
    """``key=value``: a column (loss=moco) or a dotted config key (optim.optimizer.lr=0.001)."""
    key, _, wanted = condition.partition("=")
    if is_column(key):
        actual = row.get(key)
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
    descending = is_metric(key) and key not in LOWER_IS_BETTER
    present = [r for r in rows if r.get(key) is not None]
    missing = [r for r in rows if r.get(key) is None]
    present.sort(key=lambda r: r[key], reverse=descending != reverse)
    return present + missing


def _cell(value: Any, column: str) -> str:
    if value is None:
        return "-"
    if is_metric(column):
        return f"{value:.4f}"
    return str(value)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] = COLUMNS) -> str:
    if not rows:
        return "(no runs)"
    columns = with_knn_columns(rows, columns)
    cells = [[_cell(r.get(c), c) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    align = [(str.rjust if c in NUMERIC or is_metric(c) else str.ljust) for c in columns]
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
    columns = with_knn_columns(rows, columns)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: row.get(c) for c in columns})
    return buffer.getvalue()

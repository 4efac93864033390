"""``contrast runs``: a table of run directories (a run, a sweep, or a whole tree)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from contrastive_cli.errors import ConfigError, UserError
from contrastive_cli.rundirs import find_runs
from contrastive_cli.tables import (
    COLUMNS,
    format_table,
    is_column,
    matches,
    run_row,
    sort_rows,
    to_csv,
)

HELP = "table of runs under outputs/ (or given paths): data, encoder, loss, overrides, the metrics they computed, status"


def main(args: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="contrast runs", description=HELP)
    parser.add_argument(
        "paths",
        nargs="*",
        type=Path,
        default=[Path("outputs")],
        help="run directories, sweeps or trees (default: outputs)",
    )
    parser.add_argument(
        "--sort",
        default="date",
        help=f"column to sort by: {', '.join(COLUMNS)}, knn<k> for another k of eval.knn_k "
        "(knn is the first k), or another metric a run computed (lowshot_1pct, recall_at_1, "
        "map_at_r, finetune_top1, rankme, alignment, uniformity...; metrics best first)",
    )
    parser.add_argument("--reverse", action="store_true", help="reverse the sort order")
    parser.add_argument(
        "--where",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="keep runs whose column or config key has this value (repeatable), "
        "e.g. --where loss=moco --where optim.optimizer.lr=0.001",
    )
    parser.add_argument("--csv", metavar="FILE", help="also write the table as CSV (- for stdout)")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON (- for stdout)")
    ns = parser.parse_args(args)
    if not is_column(ns.sort):
        raise ConfigError(
            f"--sort={ns.sort!r} is not a column; allowed: {', '.join(COLUMNS)}, knn<k> (e.g. "
            "knn20) or a metric key (lowshot_1pct, recall_at_1, map_at_r, rankme, alignment, ...)"
        )
    for condition in ns.where:
        if "=" not in condition:
            raise ConfigError(f"--where={condition!r} must look like key=value")
    runs = find_runs(ns.paths)
    rows = [(run, run_row(run)) for run in runs]
    rows = [(run, row) for run, row in rows if all(matches(run, row, c) for c in ns.where)]
    table = sort_rows([row for _, row in rows], ns.sort, ns.reverse)
    machine_readable_stdout = "-" in (ns.csv, ns.json)
    if not machine_readable_stdout:
        print(format_table(table))
    if ns.csv:
        _write(ns.csv, to_csv(table))
    if ns.json:
        _write(ns.json, json.dumps(table, indent=2) + "\n")
    return 0


def _write(target: str, text: str) -> None:
    if target == "-":
        sys.stdout.write(text)
        return
    path = Path(target).expanduser()
    if path.is_dir():
        raise UserError(f"{target} is a folder; give a file name, e.g. {path / 'runs.csv'}")
    try:
        path.write_text(text)
    except OSError as e:
        raise UserError(f"cannot write {target} ({e.strerror or e})") from None

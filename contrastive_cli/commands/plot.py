"""``contrast plot RUN_DIR [RUN_DIR...]``: curves, embedding maps and sweep plots as PNGs."""

from __future__ import annotations

import argparse
from pathlib import Path

from contrastive_cli.plots import plot_curves, plot_sweep, run_label
from contrastive_cli.rundirs import find_runs

HELP = "loss and k-NN curves (several runs on one figure), embedding map, sweep metric vs value"


def main(args: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="contrast plot", description=HELP)
    parser.add_argument("paths", nargs="+", type=Path, help="run directories or sweep directories")
    parser.add_argument(
        "--out",
        type=Path,
        help="folder for the PNGs (default: the run's or sweep's plots/, else ./plots)",
    )
    parser.add_argument(
        "--no-embedding", action="store_true", help="skip the embedding maps (slow on CPU)"
    )
    ns = parser.parse_args(args)
    runs = find_runs(ns.paths)
    if not runs:
        print("no run directories found under " + ", ".join(map(str, ns.paths)))
        return 1
    single_root = len(ns.paths) == 1
    out = ns.out or ((ns.paths[0] / "plots") if single_root else Path("plots"))
    written = [plot_curves([(run_label(r, runs), r.metrics()) for r in runs], out / "curves.png")]
    if len(runs) > 1 and (sweep := plot_sweep(runs, out / "sweep.png")) is not None:
        written.append(sweep)
    if not ns.no_embedding:
        from contrastive_cli.run import embedding_map

        for run in runs:
            target = (out if len(runs) == 1 else run.path / "plots") / "embedding.png"
            if (path := embedding_map(run, target)) is not None:
                written.append(path)
    for path in written:
        print(path)
    return 0

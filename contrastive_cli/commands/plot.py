"""``contrast plot RUN_DIR [RUN_DIR...]``: curves, embedding maps and sweep plots as PNGs."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from contrastive_cli.errors import UserError
from contrastive_cli.plots import plot_curves, plot_sweep, run_label
from contrastive_cli.rundirs import Run, find_runs
from contrastive_cli.untrusted import printable
from contrastive_cli.writer import safe_path

log = logging.getLogger(__name__)
HELP = "loss and k-NN curves (several runs on one figure), embedding map, sweep metric vs value"


def _metrics(run: Run, of: int) -> list[dict]:
    """The run's metrics.jsonl records. Over several runs, one whose file is refused
    (damaged, a link, a FIFO, numbers out of range) is left out with a warning, so one
    hostile run cannot stop the plot of a whole tree; a single run's refusal is the error."""
    try:
        return run.metrics()
    except UserError as e:
        if of == 1:
            raise
        log.warning(f"warning: {printable(e)}; {printable(run.path)} is left out of the curves")
        return []


def _current_map(run_dir: Path, target: Path) -> bool:
    """``target`` is the run's own plots/embedding.png, a plain file written after its
    encoder: t-SNE would draw the same map again (the sample and the seed are fixed)."""
    encoder = run_dir / "encoder.safetensors"
    try:
        own = target.parent.resolve() == (run_dir / "plots").resolve()
        return (
            own
            and target.is_file()
            and not target.is_symlink()
            and target.lstat().st_mtime >= encoder.lstat().st_mtime
        )
    except OSError:
        return False


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
    parser.add_argument(
        "--redraw",
        action="store_true",
        help="draw a run's embedding map again even where its plots/ holds one newer than its encoder",
    )
    ns = parser.parse_args(args)
    runs = find_runs(ns.paths)
    if not runs:
        print("no run directories found under " + ", ".join(map(str, ns.paths)))
        return 1
    single_root = len(ns.paths) == 1
    # Into a run or sweep directory only through safe_path: no write follows a link there.
    if ns.out is None and single_root:
        curves, sweep_png = (
            safe_path(ns.paths[0], f"plots/{n}") for n in ("curves.png", "sweep.png")
        )
    else:
        out = ns.out or Path("plots")
        curves, sweep_png = out / "curves.png", out / "sweep.png"
    written = [plot_curves([(run_label(r, runs), _metrics(r, len(runs))) for r in runs], curves)]
    if len(runs) > 1 and (sweep := plot_sweep(runs, sweep_png)) is not None:
        written.append(sweep)
    if not ns.no_embedding:
        from contrastive_cli.finish import embedding_map

        for run in runs:
            target = (
                curves.with_name("embedding.png")
                if len(runs) == 1
                else safe_path(run.path, "plots/embedding.png")
            )
            if not ns.redraw and _current_map(run.path, target):
                log.info(
                    f"embedding map of {printable(run.path)}: kept {printable(target)} (newer "
                    "than its encoder; --redraw draws it again)"
                )
                written.append(target)
                continue
            log.info(
                f"embedding map of {printable(run.path)}: its encoder's test features, then t-SNE"
            )
            if (path := embedding_map(run, target)) is not None:
                written.append(path)
    for path in written:
        print(path)
    return 0

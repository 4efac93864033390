"""``contrast resume RUN_DIR``: continue an interrupted run from its checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

from omegaconf import open_dict

from contrastive_cli.rundirs import load_run
from contrastive_cli.signals import Interrupted

HELP = "continue an interrupted run from checkpoints/last.pt, in its own directory"


def main(args: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="contrast resume", description=HELP)
    parser.add_argument(
        "run_dir", type=Path, help="a run directory (outputs/<date>/<time>_<loss>_<data>)"
    )
    ns = parser.parse_args(args)
    run = load_run(ns.run_dir)
    if run.status == "completed":
        print(f"{run.path} already completed; nothing to resume (see its results.json)")
        return 0
    from contrastive_cli.run import run_training

    cfg = run.config()
    with open_dict(cfg):
        cfg.trainer.resume = True
    try:
        run_training(cfg, run.path, run.choices)
    except Interrupted as e:
        return e.exit_code
    return 0

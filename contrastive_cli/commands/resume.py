"""``contrast resume RUN_DIR [overrides]``: continue an interrupted run from its checkpoint,
on any number of processes (``trainer.devices=N``) and any device."""

from __future__ import annotations

import argparse
from pathlib import Path

from omegaconf import open_dict

from contrastive_cli.config import apply_overrides
from contrastive_cli.rundirs import load_run
from contrastive_cli.signals import Interrupted

HELP = "continue an interrupted run from checkpoints/last.pt, in its own directory"
GROUPS = ("device",)  # what an override may switch: where it runs, not what it computes
KEYS = (
    "device.",
    "trainer.devices",
    "trainer.max_restarts",
    "trainer.log_every",
    "trainer.log_every_s",
    "data.root",
    "data.path",
    "data.eval_path",
    "data.download",
    "data.workers",
    "data.cache_dir",
    "tracker.mlflow.tracking_uri",  # where to log: this command's, never the run directory's
)


def main(args: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="contrast resume", description=HELP)
    parser.add_argument(
        "run_dir", type=Path, help="a run directory (outputs/<date>/<time>_<loss>_<data>)"
    )
    parser.add_argument(
        "overrides",
        nargs="*",
        help="where to continue: trainer.devices=N, device=..., data.root=... (not what it "
        "computes: the checkpoint fixes that)",
    )
    ns = parser.parse_args(args)
    run = load_run(ns.run_dir)
    if run.status == "completed":
        print(f"{run.path} already completed; nothing to resume (see its results.json)")
        return 0
    from contrastive_cli.launch import run_job

    cfg = apply_overrides(run.config(), ns.overrides, GROUPS, KEYS, "contrast resume")
    with open_dict(cfg):
        cfg.trainer.resume = True
    try:
        run_job(cfg, run.path, run.choices)
    except Interrupted as e:
        return e.exit_code
    return 0

"""``contrast resume RUN_DIR [overrides]``: continue an interrupted run from its checkpoint,
on any number of processes (``trainer.devices=N``) and any device."""

from __future__ import annotations

import argparse
from pathlib import Path

from omegaconf import open_dict

from contrastive_cli.config import apply_overrides
from contrastive_cli.rundirs import load_run
from contrastive_cli.signals import Interrupted
from contrastive_cli.starting import check_recorded

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
    check_recorded(cfg, _recorded_start(run), "contrast resume")
    with open_dict(cfg):
        cfg.trainer.resume = True
    try:
        run_job(cfg, run.path, run.choices)
    except Interrupted as e:
        return e.exit_code
    return 0


def _recorded_start(run) -> object:
    """The starting weights' record of ``run``: its checkpoint's, else its results.json's."""
    from contrastive_cli.checkpoint import latest_valid_checkpoint, load_checkpoint
    from contrastive_cli.runfiles import CHECKPOINT

    path = latest_valid_checkpoint(run.path / CHECKPOINT.parent)
    if path is not None:
        recorded = load_checkpoint(path).get("starting_weights")
        if recorded is not None:
            return recorded
    return (run.results or {}).get("starting_weights")

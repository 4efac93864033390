"""The ``contrast`` command: a thin dispatcher over subcommands.

``contrast train`` hands its arguments to Hydra (overrides, -m sweeps, --help); the
other subcommands take plain arguments.
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Callable
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

import contrastive_cli
from contrastive_cli.config import CONF_DIR, config_groups
from contrastive_cli.errors import UserError

log = logging.getLogger(__name__)


def objective(results: dict) -> float:
    """What sweepers optimise: the headline k-NN accuracy (first of eval.knn_k)."""
    knn = [v for k, v in (results.get("metrics") or {}).items() if k.startswith("knn_k")]
    return float(knn[0]) if knn else math.nan


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def _train_task(cfg: DictConfig) -> float:
    from contrastive_cli.report import write_json
    from contrastive_cli.run import run_training

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    try:
        return objective(run_training(cfg, run_dir, dict(hc.runtime.choices)))
    except UserError as e:
        write_json(run_dir / "results.json", {"status": "failed", "error": str(e), "run_dir": str(run_dir)})
        if cfg.get("debug"):
            raise
        if multirun:
            log.error(f"error: {e}")
            return math.nan
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except Exception as e:  # a bug: keep the traceback, but let a sweep's other jobs run
        write_json(run_dir / "results.json", {"status": "failed", "error": f"{type(e).__name__}: {e}", "run_dir": str(run_dir)})
        if multirun and not cfg.get("debug"):
            log.exception("job failed")
            return math.nan
        raise


def train_command(args: list[str]) -> int:
    sys.argv = ["contrast train", *args]
    _train_task()
    return 0


COMMANDS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "train": (train_command, "train an encoder with a contrastive loss, then evaluate it (Hydra overrides)"),
}


def usage() -> str:
    lines = [
        f"contrast {contrastive_cli.__version__}: contrastive self-supervised learning from the command line",
        "",
        "usage: contrast <command> [arguments]   (contrast <command> --help for more)",
        "",
        "commands:",
    ]
    lines += [f"  {name:<10} {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", "config groups for `contrast train` (group=option):"]
    lines += [f"  {group:<8} {', '.join(options)}" for group, options in config_groups().items()]
    lines += [
        "",
        "examples:",
        "  contrast train                                  digits (ships with scikit-learn), offline",
        "  contrast train loss=ntxent data=mnist",
        "  contrast train loss=moco data=fashion_mnist encoder=cnn trainer.epochs=20",
        "  contrast train -m loss=ntxent,moco,byol,triplet",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if args[0] in ("-V", "--version"):
        print(f"contrast {contrastive_cli.__version__}")
        return 0
    if args[0] not in COMMANDS:
        print(f"error: unknown command {args[0]!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    command, _ = COMMANDS[args[0]]
    try:
        return command(args[1:])
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code

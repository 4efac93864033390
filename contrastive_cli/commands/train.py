"""``contrast train``: Hydra composes the config (overrides, -m sweeps, --help), then
``run_training`` does the work."""

from __future__ import annotations

import logging
import math
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from contrastive_cli.config import CONF_DIR
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


HELP = "train an encoder with a contrastive loss, then evaluate it (Hydra overrides)"


def main(args: list[str]) -> int:
    from contrastive_cli.validate import check_command_line

    sys.argv = ["contrast train", *args]
    check_command_line(sys.argv[1:])  # one line, exit 2, before Hydra creates a run directory
    _train_task()
    return 0

"""The end of a sweep: one table of every job, sweep_results.csv, a plot; non-zero exit
when any job failed."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from contrastive_cli.rundirs import find_runs
from contrastive_cli.tables import format_table, run_row, to_csv

log = logging.getLogger(__name__)


class SweepSummary(Callback):
    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        runs = find_runs([sweep_dir]) if sweep_dir.exists() else []
        rows = [run_row(r) for r in runs]
        print(f"\nsweep {sweep_dir}: {len(rows)} jobs")
        print(
            format_table(
                rows,
                [  # contrast runs' columns, loss first (what a sweep varies most), no date/path
                    "loss",
                    "data",
                    "encoder",
                    "overrides",
                    "epochs",
                    "knn",  # and knn<k> for the other k of eval.knn_k
                    "linear",
                    "wall_s",
                    "status",
                ],
            )
        )
        if not rows:
            return
        (sweep_dir / "sweep_results.csv").write_text(to_csv(rows))
        print(f"table: {sweep_dir / 'sweep_results.csv'}")
        try:
            from contrastive_cli.plots import plot_sweep

            if (path := plot_sweep(runs, sweep_dir / "plots" / "sweep.png")) is not None:
                print(f"plot: {path}")
        except Exception as e:  # a plot must never fail a finished sweep
            log.warning(f"sweep plot failed: {e}")
        failed = [r for r in rows if r["status"] != "completed"]
        if failed:
            print(f"{len(failed)} of {len(rows)} jobs did not complete")
            raise SystemExit(1)

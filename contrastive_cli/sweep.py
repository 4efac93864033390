"""The end of a sweep: one table of every job, sweep_results.csv, a plot; non-zero exit
when any job failed."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from contrastive_cli.rundirs import find_runs
from contrastive_cli.tables import format_table, run_row, to_csv

log = logging.getLogger(__name__)


class SweepSummary(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        """[tracking] With tracker=mlflow, the sweep's parent MLflow run (see _track_sweep)."""
        sweep_dir = Path(config.hydra.sweep.dir)
        overrides = list(config.hydra.overrides.task)
        _track_sweep(config, lambda tracker: tracker.start_sweep(sweep_dir, overrides))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        runs = find_runs([sweep_dir]) if sweep_dir.exists() else []
        rows = [run_row(r) for r in runs]
        try:
            self._summarise(sweep_dir, runs, rows)
        finally:  # [tracking] the table and plot as the parent run's artifacts, then its status
            _track_sweep(config, lambda tracker: tracker.finish_sweep(sweep_dir, rows))
        failed = [r for r in rows if r["status"] != "completed"]
        if failed:
            print(f"{len(failed)} of {len(rows)} jobs did not complete")
            raise SystemExit(1)

    def _summarise(self, sweep_dir: Path, runs: list, rows: list[dict[str, Any]]) -> None:
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


def _track_sweep(config: DictConfig, action: Callable[[Any], object]) -> None:
    """[tracking] ``action(tracker)`` with the MLflow tracker the sweep's jobs share, if any.
    Only MLflow has sweep runs (TensorBoard shows each job's folder under the sweep's).
    Tracking never stops a sweep: a failure is one warning line."""
    node = config.get("tracker") or {}
    if "mlflow" not in node:
        return
    from contrastive_cli.config import build
    from contrastive_cli.tracking import one_line

    try:
        action(build(node.mlflow))
    except Exception as e:  # an unreachable server, a missing package, ...
        log.warning(f"warning: tracker=mlflow (sweep): {one_line(e)}; the sweep goes on without it")

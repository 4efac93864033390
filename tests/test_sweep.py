"""Sweeps through Hydra's plugins (installed by `make install`, the `sweep` extra): Optuna
maximises the returned k-NN accuracy, the joblib launcher runs jobs in parallel processes,
and both end with contrast's sweep table in the one sweep directory."""

from __future__ import annotations

import csv

import pytest
import yaml

from tests.conftest import TINY, read_results, run_cli, run_dirs

CFG = [o for o in TINY if not o.startswith("trainer.epochs")] + [
    "trainer.epochs=1",
    "eval.plots=false",
    "eval.baselines=false",
    "eval.every=0",
]


def _sweep_dir(tmp_path):
    runs = run_dirs(tmp_path / "outputs" / "multirun")
    [sweep] = {r.parent for r in runs}
    return sweep, runs


def _optuna(tmp_path, *extra: str):
    """A tiny Optuna search over the learning rate: its stdout, each trial's k-NN accuracy,
    and Optuna's optimization_results.yaml."""
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    proc = run_cli(
        [
            "train",
            "-m",
            "hydra/sweeper=optuna",
            "hydra.sweeper.sampler.seed=0",
            "optim.optimizer.lr=interval(1e-4,1e-2)",
            *extra,
            *CFG,
        ],
        cwd=tmp_path,
        check=True,
    )
    sweep, runs = _sweep_dir(tmp_path)
    knn = [read_results(r)["metrics"]["knn_k200"] for r in runs]
    return (
        proc.stdout,
        sweep,
        knn,
        yaml.safe_load((sweep / "optimization_results.yaml").read_text()),
    )


def test_optuna_sweep_maximises_knn_accuracy(tmp_path):
    stdout, sweep, knn, best = _optuna(tmp_path, "hydra.sweeper.n_trials=2")
    assert len(knn) == 2 and "2 jobs" in stdout
    # Optuna minimises unless told otherwise; contrast tells it to maximise accuracy.
    assert best["best_value"] == pytest.approx(max(knn))
    rows = list(csv.DictReader((sweep / "sweep_results.csv").open()))
    assert sorted(float(r["knn"]) for r in rows) == pytest.approx(sorted(knn))


def test_an_explicit_optuna_direction_is_respected(tmp_path):
    _, _, knn, best = _optuna(
        tmp_path, "hydra.sweeper.direction=minimize", "hydra.sweeper.n_trials=2"
    )
    assert best["best_value"] == pytest.approx(min(knn))


def test_parallel_launcher_runs_every_job_and_writes_the_table(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    proc = run_cli(
        ["train", "-m", "hydra/launcher=local_parallel", "loss=ntxent,triplet", *CFG],
        cwd=tmp_path,
        check=True,
    )
    sweep, runs = _sweep_dir(tmp_path)
    assert sorted(read_results(r)["loss"] for r in runs) == ["ntxent", "triplet"]
    assert all(read_results(r)["status"] == "completed" for r in runs)
    rows = list(csv.DictReader((sweep / "sweep_results.csv").open()))
    assert sorted(r["loss"] for r in rows) == ["ntxent", "triplet"]
    assert "2 jobs" in proc.stdout

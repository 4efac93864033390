"""Trackers never take a destination from a run directory: the store, the server and the
folders come from the current command line and environment; files sent to a tracker are
regular files inside the run directory, never through a link."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from contrastive_cli.rundirs import load_run
from contrastive_cli.tracking import Trackers
from tests.test_rebuild import record

pytest.importorskip("mlflow")


def test_a_recorded_tracking_uri_is_dropped_when_the_config_is_rebuilt(tmp_path):
    elsewhere = tmp_path / "theirs.db"
    run = record(
        tmp_path / "run", ["tracker=mlflow", f"tracker.mlflow.tracking_uri=sqlite:///{elsewhere}"]
    )
    loaded = load_run(run)
    assert loaded.problem is None, loaded.problem
    cfg = loaded.config()
    assert cfg.tracker.mlflow.tracking_uri is None  # this command's: flag, else environment
    assert not any("tracking_uri" in o for o in loaded.overrides)


def test_resume_never_logs_to_the_store_a_run_directory_names(tmp_path, monkeypatch, caplog):
    from mlflow.tracking import MlflowClient

    from contrastive_cli.tracking.mlflow_tracker import MlflowTracker

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    theirs = tmp_path / "elsewhere" / "theirs.db"
    run = tmp_path / "run"
    run.mkdir()
    (run / "tracking.json").write_text(
        json.dumps({"mlflow": {"tracking_uri": f"sqlite:///{theirs}", "run_id": "a" * 32}})
    )
    tracker = MlflowTracker()
    with caplog.at_level(logging.WARNING):
        tracker.start(run, {"trainer": {"epochs": 1}}, {"loss": "ntxent"}, resumed=True)
    assert not theirs.parent.exists(), "wrote to the store the run directory named"
    ours = tmp_path / "outputs" / "mlflow.db"
    assert ours.is_file()
    [mlrun] = MlflowClient(f"sqlite:///{ours}").search_runs(
        [e.experiment_id for e in MlflowClient(f"sqlite:///{ours}").search_experiments()]
    )
    assert mlrun.info.run_id == tracker.run_id != "a" * 32
    assert "another store" in caplog.text and str(theirs) not in caplog.text
    saved = json.loads((run / "tracking.json").read_text())["mlflow"]
    assert saved["tracking_uri"] == f"sqlite:///{ours}"


def test_tensorboard_never_writes_through_a_linked_folder(tmp_path, caplog):
    from contrastive_cli.tracking.tensorboard_tracker import TensorboardTracker

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    run = tmp_path / "run"
    run.mkdir()
    (run / "tensorboard").symlink_to(elsewhere)
    trackers = Trackers([TensorboardTracker()])
    with caplog.at_level(logging.WARNING):
        trackers.start(run, {"a": 1}, {}, resumed=False)
        trackers.log_epoch({"epoch": 1, "step": 1, "loss": 1.0})
        trackers.finish("completed", {}, run)
    assert list(elsewhere.iterdir()) == []
    assert "symbolic link" in caplog.text and len(caplog.records) == 1


def test_a_resumed_run_in_the_same_store_continues_its_mlflow_run(tmp_path, monkeypatch):
    from contrastive_cli.tracking.mlflow_tracker import MlflowTracker

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run = tmp_path / "run"
    run.mkdir()
    first = MlflowTracker()
    first.start(run, {"trainer": {"epochs": 1}}, {}, resumed=False)
    first.finish("interrupted", {}, run)
    again = MlflowTracker()
    again.start(run, {"trainer": {"epochs": 1}}, {}, resumed=True)
    assert again.run_id == first.run_id
    assert Path(tmp_path / "outputs" / "mlflow.db").is_file()


def test_a_value_read_from_the_environment_is_never_saved(monkeypatch):
    """A token in a tracking URI, passed as ${oc.env:...}: config.yaml says where it came
    from, not what it is (data.root, a path the comparison needs, stays)."""
    from omegaconf import OmegaConf

    from contrastive_cli.command_line import compose_with_hydra
    from contrastive_cli.rebuild import saved_config

    monkeypatch.setenv("CONTRAST_TEST_TOKEN", "https://user:hunter2@mlflow.example")
    monkeypatch.setenv("CONTRAST_DATA", "/my/data")
    cfg = compose_with_hydra(
        ["tracker=mlflow", "tracker.mlflow.tracking_uri=${oc.env:CONTRAST_TEST_TOKEN}"]
    )
    text = saved_config(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]))
    assert "hunter2" not in text and "CONTRAST_TEST_TOKEN" in text
    assert "root: /my/data" in text

"""Trackers open on what matters, read back offline the way the UIs read them: MLflow's SQLite
store through MlflowClient, TensorBoard's event files through its own reader."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from contrastive_cli.tracking import results_markdown

pytestmark = pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("mlflow", "tensorboard")),
    reason="needs the tracking extra",
)

CONFIG = {
    "loss": {"_target_": "contrastive_cli.methods.simclr.SimCLR", "temperature": 0.5},
    "optim": {"optimizer": {"_target_": "torch.optim.Adam", "_partial_": True, "lr": 0.001}},
    "trainer": {"epochs": 2},
}
EPOCHS = [
    {"epoch": 1, "step": 22, "loss": 4.4, "lr": 1e-3, "images_per_s": 600.0, "knn": 0.90},
    {"epoch": 2, "step": 44, "loss": 3.9, "lr": 0.0, "images_per_s": 610.0, "knn": 0.92},
]
RESULTS = {
    "steps": 44,
    "metrics": {"knn_k200": 0.9167, "knn_k20": 0.9417, "linear_top1": 0.9722},
    "baselines": {
        "raw_pixels": {"knn_k200": 0.9333, "knn_k20": 0.9694, "linear_top1": 0.9528},
        "random_init": {"knn_k200": 0.85, "knn_k20": 0.9361, "linear_top1": 0.9417},
    },
}


def test_the_results_table_puts_each_metric_beside_both_baselines():
    table = results_markdown(RESULTS)
    assert table is not None
    assert table.splitlines()[0] == "| metric | trained | raw pixels | random init |"
    assert "| knn_k200 | 0.9167 | 0.9333 | 0.85 |" in table.splitlines()
    assert "| linear_top1 | 0.9722 | 0.9528 | 0.9417 |" in table.splitlines()
    assert results_markdown({"metrics": {}}) is None


def test_mlflow_opens_on_runs_with_params_free_of_target_noise_and_the_results_on_top(
    tmp_path: Path,
):
    from mlflow import MlflowClient

    from contrastive_cli.tracking.mlflow_tracker import MlflowTracker, experiment_id_for

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run = tmp_path / "run"
    run.mkdir()
    tracker = MlflowTracker(tracking_uri=uri)
    tracker.start(run, CONFIG, {"loss": "ntxent", "optim": "adam"}, resumed=False)
    for record in EPOCHS:
        tracker.log_epoch(record)
    tracker.finish("completed", RESULTS, run)

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("contrast")
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    [mlrun] = client.search_runs([experiment.experiment_id])
    params = mlrun.data.params
    assert not [k for k in params if k.rsplit(".", 1)[-1].startswith("_")], params
    assert params["loss"] == "ntxent" and params["loss.temperature"] == "0.5"
    assert params["optim.optimizer.lr"] == "0.001"
    note = mlrun.data.tags["mlflow.note.content"]
    assert note.startswith("completed") and "| knn_k200 | 0.9167 | 0.9333 | 0.85 |" in note
    assert mlrun.data.metrics["knn_k200"] == 0.9167
    # An experiment made before (or by someone else) is marked when a run is logged to it.
    made = client.create_experiment("older")
    assert experiment_id_for(client, "older", uri) == made
    assert client.get_experiment(made).tags["mlflow.experimentKind"] == "custom_model_development"


def test_tensorboard_opens_on_the_loss_and_the_monitor_with_baselines_in_one_card(
    tmp_path: Path,
):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from contrastive_cli.tracking.tensorboard_tracker import TensorboardTracker

    run = tmp_path / "run"
    run.mkdir()
    tracker = TensorboardTracker()
    tracker.start(run, CONFIG, {}, resumed=False)
    tracker.log_step(10, {"loss": 4.5, "lr": 1e-3})
    for record in EPOCHS:
        tracker.log_epoch(record)
    tracker.finish("completed", RESULTS, run)

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    cards = sorted(events.Tags()["scalars"])  # TensorBoard's order: by name
    assert cards[:2] == ["epoch/loss", "epoch/monitor_knn"], cards
    assert not [c for c in cards if c.startswith("baseline")]
    assert [e.value for e in events.Scalars("epoch/monitor_knn")] == pytest.approx([0.90, 0.92])
    assert {"final/knn_k200", "train/images_per_s", "train/loss"} <= set(cards)
    [text] = events.Tensors("results/text_summary")
    table = text.tensor_proto.string_val[0].decode()
    assert "| knn_k200 | 0.9167 | 0.9333 | 0.85 |" in table


# What MLflow 3.17's UI reads from a saved view's state (ExperimentPageUIState's fields and
# the search facets, as listed in its bundle): a key outside these is silently ignored.
UI_STATE_FIELDS = {
    "selectedColumns", "columnOrder", "columnWidths", "runsExpanded", "runsPinned",
    "runsHidden", "runsVisibilityMap", "runsHiddenMode", "compareRunCharts",
    "compareRunSections", "viewMaximized", "runListHidden", "isAccordionReordered", "groupBy",
    "groupsExpanded", "autoRefreshEnabled", "useGroupedValuesInCharts", "hideEmptyCharts",
    "globalLineChartConfig", "chartsSearchFilter",
}  # fmt: skip
SEARCH_FACETS = {"searchFilter", "orderByKey", "orderByAsc", "startTime", "lifecycleFilter"}


def _view(client, experiment_id: str) -> tuple[dict, dict]:
    import json

    from contrastive_cli.tracking.mlflow_view import TAG

    envelope = json.loads(client.get_experiment(experiment_id).tags[TAG])
    assert isinstance(envelope["name"], str) and isinstance(envelope["createdAt"], int)
    return envelope, json.loads(envelope["state"])  # the UI takes plain JSON or deflate;


def test_mlflow_saved_view_puts_the_compared_metrics_and_training_curves_first(
    tmp_path: Path, caplog
):
    import json

    from mlflow import MlflowClient

    from contrastive_cli.tracking.mlflow_tracker import MlflowTracker
    from contrastive_cli.tracking.mlflow_view import TAG

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = {
        **CONFIG,
        "eval": {"metrics": ["knn", "linear", "rankme"], "knn_k": [200, 20], "baselines": True},
    }
    run = tmp_path / "run"
    run.mkdir()
    tracker = MlflowTracker(tracking_uri=uri)
    with caplog.at_level("INFO"):
        tracker.start(run, config, {"loss": "ntxent", "data": "digits"}, resumed=False)
    tracker.log_step(11, {"loss": 4.5, "lr": 1e-3})
    for record in EPOCHS:
        tracker.log_epoch(record)
    tracker.finish("completed", RESULTS, run)

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("contrast")
    [mlrun] = client.search_runs([experiment.experiment_id])
    envelope, state = _view(client, experiment.experiment_id)
    assert envelope["name"] == "contrast: accuracy first"
    assert set(state) <= UI_STATE_FIELDS | SEARCH_FACETS, set(state) - UI_STATE_FIELDS
    # The table: the compared metrics as the first columns, then the chosen options; every
    # column names a metric or param this run really logged; best k-NN on top.
    metrics = ["knn_k200", "linear_top1", "raw_pixels.knn_k200", "random_init.knn_k200"]
    assert state["selectedColumns"] == [f"metrics.`{m}`" for m in metrics] + [
        "params.`loss`",
        "params.`data`",
        "params.`encoder`",
    ]
    assert set(metrics) <= set(mlrun.data.metrics)
    assert {"loss", "data"} <= set(mlrun.data.params)
    assert state["columnOrder"] == state["selectedColumns"]
    assert (state["orderByKey"], state["orderByAsc"]) == ("metrics.`knn_k200`", False)
    # The charts: a Training section first with the curves the loop logs, then the results.
    sections = [s["name"] for s in state["compareRunSections"]]
    assert sections[0] == "Training" and state["isAccordionReordered"] is True
    training = state["compareRunSections"][0]["uuid"]
    curves = [c["metricKey"] for c in state["compareRunCharts"] if c["metricSectionId"] == training]
    assert curves == ["epoch_loss", "monitor_knn", "loss", "lr"]
    assert set(curves) <= set(mlrun.data.metrics)
    assert all(len(client.get_metric_history(mlrun.info.run_id, c)) >= 1 for c in curves)
    bars = [c["metricKey"] for c in state["compareRunCharts"] if c["type"] == "BAR"]
    assert bars == metrics
    link = f"#/experiments/{experiment.experiment_id}/runs?viewStateShareKey=contrast"
    assert any(link in r.getMessage() for r in caplog.records)

    # Another run with another headline k updates the same view (no second copy, same
    # creation time); a view someone saved over it in the UI is left as they saved it.
    again = tmp_path / "again"
    again.mkdir()
    other = {**config, "eval": {**config["eval"], "knn_k": [20]}}
    MlflowTracker(tracking_uri=uri).start(again, other, {}, resumed=False)
    updated, state = _view(client, experiment.experiment_id)
    assert state["orderByKey"] == "metrics.`knn_k20`"
    assert updated["createdAt"] == envelope["createdAt"]
    views = [k for k in client.get_experiment(experiment.experiment_id).tags if "ViewState" in k]
    assert views == [TAG]
    theirs = json.dumps({"name": "mine", "createdAt": 1, "state": "{}"})
    client.set_experiment_tag(experiment.experiment_id, TAG, theirs)
    third = tmp_path / "third"
    third.mkdir()
    MlflowTracker(tracking_uri=uri).start(third, config, {}, resumed=False)
    assert client.get_experiment(experiment.experiment_id).tags[TAG] == theirs

"""Tracking with the real CLI, read back the way users read it: MLflow's SQLite store through
MlflowClient, an MLflow server through its REST API, TensorBoard's event files through
TensorBoard's own reader. No mocks: a run is trained, stopped with SIGTERM, resumed, swept."""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, TINY, read_results, run_cli, run_dirs

pytestmark = pytest.mark.skipif(
    not all(importlib.util.find_spec(m) for m in ("mlflow", "tensorboard")),
    reason="needs the tracking extra: pip install 'contrastive-cli[tracking]'",
)

# 3 epochs x 22 steps on digits; loss and lr every 10 steps of an epoch (steps 10, 20, 32, ...).
CFG = [o for o in TINY if not o.startswith("trainer.epochs")] + ["trainer.epochs=3"]
QUICK = [  # a job whose training is what matters: no baselines, no plots
    *(o for o in TINY if not o.startswith("trainer.epochs")),
    "trainer.epochs=1",
    "eval.baselines=false",
    "eval.plots=false",
]
STEPS_PER_EPOCH, LOG_EVERY = 22, 10


def _store(root: Path):
    """The default store of runs started in ``root``: outputs/mlflow.db, no server."""
    from mlflow import MlflowClient

    db = root / "outputs" / "mlflow.db"
    assert db.is_file(), f"no MLflow database at {db}"
    return MlflowClient(tracking_uri=f"sqlite:///{db}")


def _runs(client) -> list:
    experiment = client.get_experiment_by_name("contrast")
    return client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])


def _artifacts(client, run_id: str, path: str | None = None) -> set[str]:
    found = set()
    for entry in client.list_artifacts(run_id, path):
        found |= _artifacts(client, run_id, entry.path) if entry.is_dir else {entry.path}
    return found


def _logged_steps(epochs: int) -> list[int]:
    """Where the loop logs: every LOG_EVERY-th batch of each epoch."""
    return [
        e * STEPS_PER_EPOCH + b
        for e in range(epochs)
        for b in range(LOG_EVERY, STEPS_PER_EPOCH + 1, LOG_EVERY)
    ]


def _records(run: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines() if ln]


# --------------------------------------------------------------------------- one run, both trackers
@pytest.fixture(scope="module")
def stopped_and_resumed(tmp_path_factory):
    """A run with tracker=[mlflow,tensorboard], stopped by SIGTERM after its first epoch, what
    MLflow held then, and the same run resumed to the end with `contrast resume`."""
    root = tmp_path_factory.mktemp("tracked")
    run = root / "outputs" / "run"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "contrastive_cli",
            "train",
            "tracker=[mlflow,tensorboard]",
            "tracker.mlflow.log_encoder=true",
            *CFG,
            f"hydra.run.dir={run}",
        ],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 300
    while not (run / "metrics.jsonl").exists() or not (run / "metrics.jsonl").read_text().strip():
        assert proc.poll() is None and time.time() < deadline, (
            proc.stdout.read() if proc.stdout else ""
        )
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    first_output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 143, first_output
    client = _store(root)
    [stopped] = _runs(client)
    tracking_json = json.loads((run / "tracking.json").read_text())
    resumed = run_cli(["resume", str(run)], cwd=root, check=True)
    return root, run, stopped, tracking_json, first_output + resumed.stdout + resumed.stderr


def test_an_interrupted_run_is_killed_in_mlflow(stopped_and_resumed):
    _, run, stopped, tracking_json, _ = stopped_and_resumed
    assert stopped.info.status == "KILLED"
    assert stopped.data.tags["contrast.status"] == "interrupted"
    assert tracking_json["mlflow"]["run_id"] == stopped.info.run_id
    assert stopped.data.tags["contrast.run_dir"] == str(run.resolve())


def test_resume_continues_the_same_mlflow_run(stopped_and_resumed):
    root, run, stopped, tracking_json, output = stopped_and_resumed
    client = _store(root)
    [finished] = _runs(client)  # no second run: the same one, finished
    assert finished.info.run_id == stopped.info.run_id
    assert json.loads((run / "tracking.json").read_text()) == tracking_json
    assert finished.info.status == "FINISHED"
    assert finished.data.tags["contrast.status"] == "completed"
    # Every logged step once, in order, across the interruption.
    loss = client.get_metric_history(finished.info.run_id, "loss")
    assert [m.step for m in loss] == _logged_steps(3)
    lr = client.get_metric_history(finished.info.run_id, "lr")
    assert [m.step for m in lr] == _logged_steps(3) and all(m.value >= 0 for m in lr)
    # Per epoch: what metrics.jsonl holds (a resumed run's file equals an uninterrupted one's).
    records = _records(run)
    assert [r["epoch"] for r in records] == [1, 2, 3]
    for key, field in (
        ("epoch_loss", "loss"),
        ("monitor_knn", "knn"),
        ("images_per_s", "images_per_s"),
    ):
        history = client.get_metric_history(finished.info.run_id, key)
        assert [(m.step, m.value) for m in history] == [(r["step"], r[field]) for r in records]
    assert "warning: tracker" not in output


def test_mlflow_run_holds_params_final_metrics_tags_and_artifacts(stopped_and_resumed, tmp_path):
    root, run, *_ = stopped_and_resumed
    client = _store(root)
    [mlrun] = _runs(client)
    results = read_results(run)
    params = mlrun.data.params
    # The flattened resolved config and the chosen options; not where it was logged, not resume.
    assert params["loss"] == "ntxent" and params["data"] == "digits" and params["encoder"] == "cnn"
    assert params["trainer.epochs"] == "3" and params["trainer.batch_size"] == "64"
    assert params["eval.knn_k"] == "[200, 20]" and params["data.name"] == "digits"
    assert "loss._target_" not in params  # the option (params["loss"]) names the object
    assert (
        not any(k.startswith(("tracker", "hydra")) for k in params)
        and "trainer.resume" not in params
    )
    # Final metrics: the evaluation and both baselines, as results.json has them.
    metrics = mlrun.data.metrics
    for key in ("knn_k200", "knn_k20", "linear_top1"):
        assert metrics[key] == results["metrics"][key]
        for baseline in ("raw_pixels", "random_init"):
            assert metrics[f"{baseline}.{key}"] == results["baselines"][baseline][key]
    assert metrics["wall_time_s"] == results["wall_time_s"]
    # Tags: status, git commit, versions.
    tags = mlrun.data.tags
    assert tags["contrast.version.torch"] == results["versions"]["torch"]
    if results["versions"]["git_sha"]:
        assert tags["contrast.git_sha"] == results["versions"]["git_sha"]
        assert results["versions"]["git_sha"].startswith(tags["mlflow.source.git.commit"])
    # Artifacts: the config, results, plots and (asked for) the encoder; results as on disk.
    artifacts = _artifacts(client, mlrun.info.run_id)
    assert {
        ".hydra/config.yaml",
        "results.json",
        "metrics.jsonl",
        "plots/curves.png",
        "plots/embedding.png",
        "encoder.safetensors",
    } <= artifacts
    local = client.download_artifacts(mlrun.info.run_id, "results.json", str(tmp_path))
    assert json.loads(Path(local).read_text()) == results


def test_tensorboard_scalars_and_projector(stopped_and_resumed):
    from google.protobuf import text_format
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.projector.projector_config_pb2 import ProjectorConfig

    _, run, *_ = stopped_and_resumed
    logdir = run / "tensorboard"
    events = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {
        "train/loss",
        "train/lr",
        "epoch/loss",
        "train/images_per_s",
        "epoch/monitor_knn",
    } <= tags
    assert "final/knn_k200" in tags and not [t for t in tags if t.startswith("baseline")]
    # The events of the attempt that was stopped are purged from the resume point on.
    assert [e.step for e in events.Scalars("train/loss")] == _logged_steps(3)
    records = _records(run)
    epoch_loss = events.Scalars("epoch/loss")
    assert [e.step for e in epoch_loss] == [r["step"] for r in records]
    assert [e.value for e in epoch_loss] == pytest.approx([r["loss"] for r in records], rel=1e-6)
    results = read_results(run)
    [final] = events.Scalars("final/knn_k200")
    assert final.step == results["steps"] and final.value == pytest.approx(
        results["metrics"]["knn_k200"]
    )

    # The projector: the trained encoder's features of the embedding map's test images.
    config = text_format.Parse((logdir / "projector_config.pbtxt").read_text(), ProjectorConfig())
    [embedding] = config.embeddings
    tensors = np.loadtxt(logdir / embedding.tensor_path, delimiter="\t", ndmin=2)
    # label and class name per point (digits' class names are the digits themselves)
    header, *rows = (logdir / embedding.metadata_path).read_text().splitlines()
    assert header.split("\t") == ["label", "class"]
    labels = [int(row.split("\t")[0]) for row in rows]
    assert all(row.split("\t")[1] == row.split("\t")[0] for row in rows)
    assert list(embedding.sprite.single_image_dim) == [8, 8]
    assert (logdir / embedding.sprite.image_path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    expected = _embedding_of(run)
    assert tensors.shape == (200, expected.features.shape[1]) and len(labels) == 200
    assert labels == expected.labels.tolist()
    np.testing.assert_allclose(tensors, expected.features.numpy(), rtol=1e-5, atol=1e-6)


def _embedding_of(run: Path):
    """The embedding map's sample, recomputed from the saved encoder and config."""
    from safetensors.torch import load_file

    from contrastive_cli.config import build
    from contrastive_cli.finish import embedding_sample
    from contrastive_cli.parts import build_encoder, load_data
    from contrastive_cli.rundirs import load_run

    cfg = load_run(run).config()
    encoder = build_encoder(cfg, cfg.trainer.seed)
    encoder.load_state_dict(load_file(str(run / "encoder.safetensors")))
    runtime = build(cfg.device)
    return embedding_sample(
        encoder.to(runtime.device),
        load_data(cfg),
        build(cfg.data.augment),
        runtime,
        cfg.eval.embedding_points,
        cfg.eval.batch_size,
        cfg.trainer.seed,
    )


def test_results_json_is_group_readable_and_no_temp_file_is_left(stopped_and_resumed):
    _, run, *_ = stopped_and_resumed
    umask = os.umask(0)
    os.umask(umask)
    for name in ("results.json", "tracking.json"):
        assert stat.S_IMODE((run / name).stat().st_mode) == 0o666 & ~umask
    assert not list(run.glob(".*.tmp"))


def test_a_failed_results_write_leaves_no_temp_file(tmp_path):
    from contrastive_cli.report import write_json

    with pytest.raises(TypeError):
        write_json(tmp_path / "results.json", {"not json": object()})
    assert list(tmp_path.iterdir()) == []


def test_diverged_and_failed_runs_are_marked_in_mlflow(
    stopped_and_resumed, compose_cfg, monkeypatch, tmp_path
):
    from contrastive_cli.errors import ConfigError, Diverged
    from contrastive_cli.methods.simclr import SimCLR
    from contrastive_cli.run import run_training

    root = stopped_and_resumed[0]
    store = [
        "tracker=mlflow",
        f"tracker.mlflow.tracking_uri=sqlite:///{root / 'outputs' / 'mlflow.db'}",
        "tracker.mlflow.experiment=faults",
    ]
    original, calls = SimCLR.forward, {"n": 0}

    def nan_at_step_3(self, views, labels=None):  # the fault test_divergence injects
        calls["n"] += 1
        loss = original(self, views, labels)
        return loss * math.nan if calls["n"] == 3 else loss

    monkeypatch.setattr(SimCLR, "forward", nan_at_step_3)
    with pytest.raises(Diverged):
        run_training(compose_cfg(*TINY, *store), tmp_path / "diverged", {"loss": "ntxent"})
    with pytest.raises(ConfigError, match="larger than"):  # fails after tracking started
        run_training(
            compose_cfg(*TINY, *store, "trainer.batch_size=100000"), tmp_path / "failed", {}
        )
    client = _store(root)
    experiment = client.get_experiment_by_name("faults")
    found = {r.info.run_name: r for r in client.search_runs([experiment.experiment_id])}
    assert set(found) == {"diverged", "failed"}
    assert found["diverged"].info.status == "FAILED"
    assert found["diverged"].data.tags["contrast.status"] == "diverged"
    assert "diverged at step 3" in found["diverged"].data.tags["contrast.error"]
    assert found["failed"].info.status == "FAILED"
    assert found["failed"].data.tags["contrast.status"] == "failed"
    assert "larger than" in found["failed"].data.tags["contrast.error"]


# --------------------------------------------------------------------------- a sweep
@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A 2-job sweep logged to MLflow, with eval.knn_k=[50,10] (not the default ks)."""
    root = tmp_path_factory.mktemp("sweep")
    proc = run_cli(
        [
            "train",
            "-m",
            "loss=ntxent,triplet",
            "tracker=mlflow",
            "eval.knn_k=[50,10]",
            *QUICK,
            "eval.every=0",  # no monitor: the final k-NN is what the tables show
        ],
        cwd=root,
        check=True,
    )
    runs = run_dirs(root / "outputs" / "multirun")
    [sweep_dir] = {r.parent for r in runs}
    return root, sweep_dir, runs, proc.stdout


def test_a_sweep_is_a_parent_run_with_one_child_per_job(sweep, tmp_path):
    root, sweep_dir, runs, _ = sweep
    client = _store(root)
    all_runs = _runs(client)
    [parent] = [r for r in all_runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in all_runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(all_runs) == 3 and len(children) == 2
    assert parent.info.status == "FINISHED" and parent.data.tags["contrast.status"] == "completed"
    assert parent.data.tags["contrast.sweep_dir"] == str(sweep_dir.resolve())
    assert "loss=ntxent,triplet" in parent.data.params["sweep"]
    assert parent.data.metrics["jobs"] == 2 and parent.data.metrics["jobs_completed"] == 2
    assert {"sweep_results.csv", "plots/sweep.png"} <= _artifacts(client, parent.info.run_id)
    table = client.download_artifacts(parent.info.run_id, "sweep_results.csv", str(tmp_path))
    assert Path(table).read_text() == (sweep_dir / "sweep_results.csv").read_text()
    by_dir = {r.data.tags["contrast.run_dir"]: r for r in children}
    assert set(by_dir) == {str(r.resolve()) for r in runs}
    for run in runs:
        child, results = by_dir[str(run.resolve())], read_results(run)
        assert child.info.status == "FINISHED"
        assert child.data.params["loss"] == results["loss"]
        assert child.data.params["eval.knn_k"] == "[50, 10]"
        assert child.data.metrics["knn_k50"] == results["metrics"]["knn_k50"]
        assert child.data.metrics["knn_k10"] == results["metrics"]["knn_k10"]
    assert parent.data.metrics["best_knn"] == max(
        read_results(r)["metrics"]["knn_k50"] for r in runs
    )


def test_eval_knn_k_flows_to_tables_plots_and_the_sweep_table(sweep, capsys):
    from contrastive_cli.commands import runs as runs_command
    from contrastive_cli.plots import sweep_scores
    from contrastive_cli.rundirs import load_run

    _, sweep_dir, runs, stdout = sweep
    knn50 = {r.name: read_results(r)["metrics"]["knn_k50"] for r in runs}
    knn10 = {r.name: read_results(r)["metrics"]["knn_k10"] for r in runs}
    # The sweep's printed table and sweep_results.csv: knn is k=50, knn10 its own column.
    header = next(ln for ln in stdout.splitlines() if ln.startswith("loss"))
    assert header.split()[:8] == [
        "loss",
        "data",
        "encoder",
        "overrides",
        "epochs",
        "knn",
        "knn10",
        "linear",
    ]
    rows = list(csv.DictReader((sweep_dir / "sweep_results.csv").open()))
    assert {Path(r["path"]).name: float(r["knn"]) for r in rows} == knn50
    assert {Path(r["path"]).name: float(r["knn10"]) for r in rows} == knn10
    # contrast runs: no blanks, sortable by either k.
    assert runs_command.main([str(sweep_dir), "--sort", "knn10", "--json", "-"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [r["knn10"] for r in listed] == sorted(knn10.values(), reverse=True)
    assert {Path(r["path"]).name: r["knn"] for r in listed} == knn50
    # The sweep plot's points: each job's k=50 accuracy, none NaN.
    scores, label = sweep_scores([load_run(r) for r in runs])
    assert scores == [knn50[r.name] for r in runs] and not any(map(math.isnan, scores))
    assert label == "k-NN k=50" and (sweep_dir / "plots" / "sweep.png").is_file()
    # The results table at the end of each job names the ks it measured.
    log = (runs[0] / "train.log").read_text()
    assert "k-NN k=50" in log and "k-NN k=10" in log and "k=200" not in log


# --------------------------------------------------------------------------- a server
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, body: dict | None = None) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_an_unreachable_server_is_one_warning_and_the_run_completes(tmp_path):
    uri = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    start = time.perf_counter()
    proc = run_cli(
        ["train", "tracker=mlflow", *QUICK, f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path,
        env={"MLFLOW_TRACKING_URI": uri},
        check=True,
    )
    elapsed = time.perf_counter() - start
    output = proc.stdout + proc.stderr
    warnings = [ln for ln in output.splitlines() if "tracker=mlflow" in ln]
    assert len(warnings) == 1, output
    assert uri in warnings[0] and str(tmp_path / "run") in warnings[0]
    assert "Traceback" not in output
    assert read_results(tmp_path / "run")["status"] == "completed"
    assert not (tmp_path / "run" / "tracking.json").exists()
    assert elapsed < 120  # seconds of probing, not MLflow's minutes of retries


@pytest.mark.slow  # an MLflow server takes 10-30 s to start on 2 cores
def test_a_run_logged_to_an_mlflow_server_reads_back_over_rest(tmp_path):
    port = _free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'server.db'}",
            "--artifacts-destination",
            str(tmp_path / "artifacts"),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
        ],
        cwd=tmp_path,
        env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # the server's workers go with it
    )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(f"{uri}/health", timeout=2).close()
                break
            except OSError:
                assert server.poll() is None and time.time() < deadline, "the server did not start"
                time.sleep(0.5)
        run = tmp_path / "run"
        run_cli(
            ["train", "tracker=mlflow", *QUICK, f"hydra.run.dir={run}"],
            cwd=tmp_path,
            env={"MLFLOW_TRACKING_URI": uri},
            check=True,
        )
        api = f"{uri}/api/2.0/mlflow"
        experiment = _get(f"{api}/experiments/get-by-name?experiment_name=contrast")["experiment"]
        [found] = _get(f"{api}/runs/search", {"experiment_ids": [experiment["experiment_id"]]})[
            "runs"
        ]
        results = read_results(run)
        assert found["info"]["status"] == "FINISHED"
        assert (
            found["info"]["run_id"]
            == json.loads((run / "tracking.json").read_text())["mlflow"]["run_id"]
        )
        params = {p["key"]: p["value"] for p in found["data"]["params"]}
        assert params["loss"] == "ntxent" and params["trainer.epochs"] == "1"
        metrics = {m["key"]: m["value"] for m in found["data"]["metrics"]}
        assert metrics["knn_k200"] == results["metrics"]["knn_k200"]
        run_id = found["info"]["run_id"]
        history = _get(f"{api}/metrics/get-history?run_id={run_id}&metric_key=loss")["metrics"]
        assert [m["step"] for m in history] == _logged_steps(1)
        listed = _get(f"{api}/artifacts/list?run_id={run_id}")["files"]
        assert {"results.json", ".hydra"} <= {f["path"] for f in listed}
        with urllib.request.urlopen(f"{uri}/get-artifact?path=results.json&run_uuid={run_id}") as r:
            assert json.loads(r.read()) == results
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


# --------------------------------------------------------------------------- setup and the fan-out
def test_a_tracker_that_is_not_installed_is_one_line_naming_the_extra(tmp_path, monkeypatch):
    from contrastive_cli.config import compose
    from contrastive_cli.errors import ConfigError
    from contrastive_cli.validate import validate

    blocked = (  # sys.modules[name] = None: what Python does for a package that is not there
        "import sys; sys.modules['mlflow'] = None; "
        "from contrastive_cli.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", blocked, "train", "tracker=mlflow", *QUICK],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    [line] = proc.stderr.strip().splitlines()
    assert "tracker=mlflow" in line and "pip install 'contrastive-cli[tracking]'" in line
    assert not (tmp_path / "outputs").exists()  # refused before a run directory exists
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(ConfigError, match=r"tracker=tensorboard needs the tensorboard package"):
        validate(compose(["tracker=[mlflow,tensorboard]"]))


def test_the_default_run_imports_no_tracker_and_rank_1_tracks_nothing():
    code = (
        "import sys\n"
        "from contrastive_cli.config import compose\n"
        "from contrastive_cli.tracking import build_trackers\n"
        "from contrastive_cli.validate import validate\n"
        "cfg = compose([])\n"
        "assert 'tracker' not in cfg and not build_trackers(cfg)\n"
        "both = compose(['tracker=[mlflow,tensorboard]'])\n"
        "validate(both)  # checks the packages are there without importing them\n"
        "assert build_trackers(both).names == ['mlflow', 'tensorboard']\n"
        "assert not build_trackers(both, rank=1)\n"
        "heavy = [m for m in ('mlflow', 'tensorboard', 'torch.utils.tensorboard') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run(
        [sys.executable, "-c", code],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        check=True,
        timeout=120,
    )


class Recorder:
    """A tracker that keeps what it is given (and can be told to fail at one call)."""

    def __init__(self, name: str, fail_at: str = ""):
        self.name, self.fail_at, self.calls = name, fail_at, []

    def __getattr__(self, method: str):
        if method not in ("start", "log_step", "log_epoch", "log_embedding", "finish", "close"):
            raise AttributeError(method)

        def call(*args):
            self.calls.append((method, args))
            if method == self.fail_at:
                raise ConnectionError("server went away\nsecond line")

        return call


def test_a_failing_tracker_is_one_warning_and_the_others_go_on(tmp_path, caplog):
    from contrastive_cli.tracking import Trackers

    broken, fine = Recorder("broken", fail_at="log_step"), Recorder("fine")
    trackers = Trackers([broken, fine])
    trackers.start(tmp_path, {"a": 1}, {"loss": "ntxent"}, False)
    for step in (10, 20, 30):
        trackers.log_step(step, {"loss": 1.0 / step, "lr": 0.1})
    trackers.log_epoch({"epoch": 1, "step": 30, "loss": 0.5})
    trackers.finish("completed", {"status": "completed"}, tmp_path)
    assert [c[0] for c in broken.calls] == ["start", "log_step", "close"]
    assert [c[0] for c in fine.calls] == [
        "start",
        "log_step",
        "log_step",
        "log_step",
        "log_epoch",
        "finish",
    ]
    assert [c[1][0] for c in fine.calls if c[0] == "log_step"] == [10, 20, 30]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [
        f"warning: tracker=broken: ConnectionError: server went away; the run goes on without it "
        f"(results in {tmp_path})"
    ]


def test_the_first_lines_say_where_the_runs_go_and_how_to_open_them(stopped_and_resumed):
    _, run, _, _, output = stopped_and_resumed
    assert "MLflow: runs go to sqlite:///" in output and "mlflow ui --backend-store-uri '" in output
    # the experiment's saved view, opened on `mlflow ui`'s address (tests/test_tracker_views.py)
    assert "/runs?viewStateShareKey=contrast" in output and "puts knn_k200, linear_top1" in output
    assert f"TensorBoard: events go to {run / 'tensorboard'}" in output
    assert f"tensorboard --logdir '{run.parent}'" in output


def test_the_restarts_of_a_group_of_processes_reach_mlflow_and_tensorboard(tmp_path):
    """results.json's ``restarts`` (trainer.max_restarts, filled by the launcher) become
    MLflow tags and a TensorBoard text, as the run's status does."""
    from mlflow import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from contrastive_cli.tracking.mlflow_tracker import MlflowTracker
    from contrastive_cli.tracking.tensorboard_tracker import TensorboardTracker

    run = tmp_path / "run"
    run.mkdir()
    restart = {"restart": 1, "failed_rank": 1, "reason": "was killed by SIGKILL"}
    results = {"steps": 30, "restarts": [{**restart, "resumed_from_step": 22}]}
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    for tracker in (MlflowTracker(tracking_uri=uri), TensorboardTracker()):
        tracker.start(run, {}, {}, False)
        tracker.finish("completed", results, run)
    tags = MlflowClient(tracking_uri=uri).search_runs(["0", "1"])[0].data.tags
    assert tags["contrast.restarts"] == "1"
    assert tags["contrast.restart.1"] == "rank 1: was killed by SIGKILL; resumed from step 22"
    [events] = [p.parent for p in run.rglob("events.out.tfevents.*")]
    texts = EventAccumulator(str(events), size_guidance={"tensors": 0}).Reload()
    [text] = texts.Tensors("restarts/text_summary")
    assert b"rank 1: was killed by SIGKILL; resumed from step 22" in text.tensor_proto.string_val[0]

"""MLflow: one MLflow run per run directory; a sweep is a parent run with one child per job.

Where: ``tracker.mlflow.tracking_uri``, else ``$MLFLOW_TRACKING_URI``, else a SQLite file
beside the runs (``outputs/mlflow.db``, artifacts in ``outputs/mlartifacts``): no server;
always from the current command line and environment, never from a run directory.
``tracking.json`` in the run directory keeps the URI and the MLflow run id, so ``contrast
resume`` continues the same MLflow run when it logs to that same store; in a sweep directory it keeps the parent run's id,
which every job (in whatever process) reads to attach itself as a child.

What: params are the flattened resolved config without Hydra's object keys (``_target_``,
``_partial_``: the chosen options ``loss``, ``data``... name the objects) and those options;
metrics are the loss and learning rate every ``trainer.log_every`` steps, per epoch the
mean loss, images/s and monitor k-NN, and at the end the evaluation and both baselines; tags
carry the status, git commit and versions, and the run's description (MLflow's
``mlflow.note.content``, the top of its page) the results table: each metric of the trained
encoder beside the baselines'. The experiment is marked a model-training one
(``mlflow.experimentKind``), so MLflow 3 opens it on its runs, not on an empty Traces page,
and gets a saved view with the compared metrics first (``mlflow_view``).
Artifacts are ``.hydra/``, ``results.json``,
``metrics.jsonl``, ``train.log``, ``plots/`` and, with ``log_encoder``, the encoder.

An unreachable server must cost seconds, not minutes: http(s) URIs are probed first with
``timeout_s``, and MLflow's own retries (7, with exponential backoff) are cut to 2 unless the
user set ``MLFLOW_HTTP_REQUEST_*`` themselves.
"""

from __future__ import annotations

import getpass
import json
import logging
import math
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from contrastive_cli.schema import Positive, Text
from contrastive_cli.tracking import (
    STATE_FILE,
    EmbeddingSample,
    TrackingUnavailable,
    is_number,
    read_state,
    require,
    restart_line,
    results_markdown,
    update_state,
)
from contrastive_cli.tracking.mlflow_view import NAME as VIEW_NAME
from contrastive_cli.tracking.mlflow_view import compared_metrics, view_link, write_view
from contrastive_cli.untrusted import is_regular

log = logging.getLogger(__name__)
DEFAULT_URI = "sqlite:///outputs/mlflow.db"
RUN_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # what MLflow run ids look like (32 hex digits)
MLFLOW_STATUS = {
    "completed": "FINISHED",
    "interrupted": "KILLED",
    "diverged": "FAILED",
    "failed": "FAILED",
}
NOT_PARAMS = (
    "tracker",
    "hydra",
    "trainer.resume",
)  # where it is logged, and resume, change nothing
# Hydra's instantiation keys: the chosen options (params ``loss``, ``encoder``...) name the
# objects; .hydra/config.yaml (an artifact) keeps them. They led MLflow's compare view.
OBJECT_KEYS = ("_target_", "_partial_", "_recursive_", "_convert_", "_args_")
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}  # MLflow 3's UI
MAX_PARAM_LENGTH = 6000  # MLflow's limit on a param value
MAX_TAG_LENGTH = 5000
BATCH = 100  # MLflow takes at most 100 params (1,000 metrics) per log_batch
RUN_ARTIFACTS = ("results.json", "metrics.jsonl", "train.log")
SWEEP_ARTIFACTS = ("sweep_results.csv", "multirun.yaml")


def _artifacts(
    directory: Path, names: Sequence[str], folders: Sequence[str]
) -> Iterator[tuple[Path, str | None]]:
    """(file, artifact folder) of the run directory's files to upload: regular files only,
    each checked with lstat, in folders that are not links themselves. A link planted in a
    run directory (``.hydra/key -> ~/.ssh/id_rsa``) is never followed or uploaded."""
    for name in names:
        if is_regular(directory / name):
            yield directory / name, None
    for folder in folders:
        path = directory / folder
        if path.is_symlink() or not path.is_dir():
            continue
        for child in sorted(path.iterdir()):
            if is_regular(child):
                yield child, folder


# the label-free metrics the monitor adds to an epoch's record (contrastive_cli.labelfree)
MONITOR_LABEL_FREE = ("rankme", "rankme_projector", "alignment", "uniformity")


class MlflowTracker:
    """Logs a run (``start`` ... ``finish``) or a sweep (``start_sweep``, ``finish_sweep``)."""

    name = "mlflow"

    def __init__(
        self,
        tracking_uri: Text | None = None,
        experiment: Text = "contrast",
        log_encoder: bool = False,
        timeout_s: Positive = 10.0,
    ):
        require("mlflow", self.name)
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.log_encoder = log_encoder
        self.timeout_s = timeout_s
        self.client: Any = None
        self.run_id: str | None = None
        self._logged_until: dict[str, int] = {}  # a resumed run's last logged step per metric

    # ------------------------------------------------------------------ one run
    def start(
        self, run_dir: Path, config: dict[str, Any], choices: dict[str, str], resumed: bool
    ) -> None:
        # Where to log comes from this command line and environment only, never from the
        # run directory: its tracking.json may only name the MLflow run to continue, and
        # only when that run is in the store this command logs to.
        state = read_state(run_dir).get(self.name, {}) if resumed else {}
        uri = resolve_uri(self.tracking_uri)
        log.info(f"MLflow: starting (tracking URI {shown(uri)}; the first start takes a while)")
        self.client = connect(uri, self.timeout_s)
        log.info(f"MLflow: runs go to {shown(uri)}; see them with: {open_command(shown(uri))}")
        run_id = state.get("run_id") if isinstance(state, dict) else None
        if not (isinstance(run_id, str) and RUN_ID.fullmatch(run_id)):
            run_id = None
        elif state.get("tracking_uri") != uri:
            log.warning(
                f"warning: tracker=mlflow: the MLflow run recorded in {run_dir / STATE_FILE} is "
                f"in another store than this command's ({shown(uri)}: tracker.mlflow.tracking_uri, "
                "else $MLFLOW_TRACKING_URI); logging to a new MLflow run there"
            )
            run_id = None
        if run_id and self._exists(run_id):
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
            self.client.set_tag(run_id, "contrast.status", "running")
            for key in ("loss", "lr", "epoch_loss", "images_per_s", "monitor_knn"):
                history = self.client.get_metric_history(run_id, key)
                self._logged_until[key] = max((m.step for m in history), default=-1)
            return
        experiment_id = experiment_id_for(self.client, self.experiment, uri)
        self._saved_view(experiment_id, uri, config)
        tags = {
            "contrast.run_dir": str(run_dir.resolve()),
            "contrast.status": "running",
            "mlflow.source.name": "contrast train",
            "mlflow.source.type": "LOCAL",
            **_user_tag(),
            **version_tags(),
        }
        parent = read_state(run_dir.parent).get(self.name, {})
        if parent.get("parent_run_id") and parent.get("tracking_uri") == uri:
            tags["mlflow.parentRunId"] = parent["parent_run_id"]
        run = self.client.create_run(experiment_id, run_name=run_dir.name, tags=tags)
        self.run_id = run.info.run_id
        update_state(
            run_dir,
            self.name,
            {"tracking_uri": uri, "experiment_id": experiment_id, "run_id": self.run_id},
        )
        params = {**flatten(config, skip=NOT_PARAMS), **run_choices(choices)}
        self._log(params=params)

    def log_step(self, step: int, values: dict[str, float]) -> None:
        self._log(
            metrics={k: v for k, v in values.items() if step > self._logged_until.get(k, -1)},
            step=step,
        )

    def log_epoch(self, record: dict[str, Any]) -> None:
        step = int(record["step"])
        metrics = {
            "epoch_loss": record["loss"],
            "images_per_s": record.get("images_per_s"),
            "monitor_knn": record.get("knn"),
            **{f"monitor_{k}": record.get(k) for k in MONITOR_LABEL_FREE},
        }
        self._log(
            metrics={
                k: v
                for k, v in metrics.items()
                if v is not None and step > self._logged_until.get(k, -1)
            },
            step=step,
        )

    def log_embedding(self, sample: EmbeddingSample, step: int) -> None:
        """Nothing: MLflow gets the embedding map as plots/embedding.png."""

    def finish(self, status: str, results: dict[str, Any], run_dir: Path) -> None:
        if self.run_id is None:
            return
        tags = {"contrast.status": status}
        if results.get("error"):
            tags["contrast.error"] = str(results["error"])
        for i, restart in enumerate(results.get("restarts") or [], 1):  # elastic restarts
            tags["contrast.restarts"] = str(i)
            tags[f"contrast.restart.{i}"] = restart_line(restart)
        if results.get("versions"):  # what results.json records (a resume may run newer code)
            tags.update(version_tags(results["versions"]))
        if table := results_markdown(results):  # the run page's description
            tags["mlflow.note.content"] = f"{status}\n\n{table}"
        self._log(
            metrics=final_metrics(results),
            tags=tags,
            step=int(results.get("steps") or 0),
        )
        for path, folder in _artifacts(run_dir, RUN_ARTIFACTS, (".hydra", "plots")):
            self.client.log_artifact(self.run_id, str(path), folder)
        encoder = run_dir / "encoder.safetensors"
        if self.log_encoder and is_regular(encoder):
            self.client.log_artifact(self.run_id, str(encoder))
        self.client.set_terminated(self.run_id, MLFLOW_STATUS.get(status, "FAILED"))

    # ------------------------------------------------------------------ a sweep
    def start_sweep(self, sweep_dir: Path, overrides: Sequence[str]) -> str:
        """Create the parent run of a sweep; jobs find it through sweep_dir/tracking.json."""
        uri = resolve_uri(self.tracking_uri)
        self.client = connect(uri, self.timeout_s)
        experiment_id = experiment_id_for(self.client, self.experiment, uri)
        tags = {
            "contrast.sweep_dir": str(sweep_dir.resolve()),
            "contrast.status": "running",
            "mlflow.source.name": "contrast train -m",
            "mlflow.source.type": "LOCAL",
            **_user_tag(),
            **version_tags(),
        }
        name = f"sweep {sweep_dir.parent.name}/{sweep_dir.name}"
        run = self.client.create_run(experiment_id, run_name=name, tags=tags)
        self.run_id = run.info.run_id
        sweep_dir.mkdir(parents=True, exist_ok=True)
        update_state(
            sweep_dir,
            self.name,
            {"tracking_uri": uri, "experiment_id": experiment_id, "parent_run_id": self.run_id},
        )
        self._log(params={"sweep": " ".join(overrides)})
        return self.run_id

    def finish_sweep(self, sweep_dir: Path, rows: Sequence[dict[str, Any]]) -> None:
        """The sweep table and plot as the parent's artifacts; FINISHED if every job completed."""
        state = read_state(sweep_dir).get(self.name, {})
        if not state.get("parent_run_id"):
            return
        uri = resolve_uri(self.tracking_uri)  # this command's store, never the file's
        if state.get("tracking_uri") != uri or not RUN_ID.fullmatch(str(state["parent_run_id"])):
            return
        self.run_id = state["parent_run_id"]
        if self.client is None:
            self.client = connect(uri, self.timeout_s)
        completed = [r for r in rows if r.get("status") == "completed"]
        scores = [r["knn"] for r in completed if r.get("knn") is not None]
        metrics = {"jobs": len(rows), "jobs_completed": len(completed)}
        if scores:
            metrics["best_knn"] = max(scores)
        status = "completed" if len(completed) == len(rows) else "failed"
        self._log(metrics=metrics, tags={"contrast.status": status})
        for path, folder in _artifacts(sweep_dir, SWEEP_ARTIFACTS, ("plots",)):
            self.client.log_artifact(self.run_id, str(path), folder)
        self.client.set_terminated(self.run_id, MLFLOW_STATUS[status])

    # ------------------------------------------------------------------ helpers
    def _saved_view(self, experiment_id: str, uri: str, config: dict[str, Any]) -> None:
        """The experiment's view with the compared metrics first (``mlflow_view``), and the
        line that says how to open it. A store that refuses it costs a warning, not the run."""
        from mlflow.exceptions import MlflowException

        metrics = compared_metrics(config)
        try:
            write_view(self.client, experiment_id, metrics)
        except MlflowException as e:
            log.warning(f"warning: tracker=mlflow: the saved view was not written ({e})")
            return
        first = ", ".join(m for m in metrics if "." not in m) or "the runs"
        log.info(
            f"MLflow: the view '{VIEW_NAME}' (Runs page, Views menu) puts {first} first, best run "
            f"on top: {view_link(shown(uri), experiment_id)}"
        )

    def _exists(self, run_id: str) -> bool:
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(run_id)
        except MlflowException:
            log.info(f"MLflow run {run_id} of this run directory is gone: starting a new one")
            return False
        return run.info.lifecycle_stage != "deleted"

    def _log(
        self,
        metrics: dict[str, Any] | None = None,
        params: dict[str, str] | None = None,
        tags: dict[str, str] | None = None,
        step: int = 0,
    ) -> None:
        from mlflow.entities import Metric, Param, RunTag

        now = int(time.time() * 1000)
        entries: list[Any] = [
            Metric(k, float(v), now, step) for k, v in (metrics or {}).items() if is_number(v)
        ]
        entries += [Param(k, v[:MAX_PARAM_LENGTH]) for k, v in (params or {}).items()]
        entries += [RunTag(k, v[:MAX_TAG_LENGTH]) for k, v in (tags or {}).items()]
        for chunk in _chunks(entries, BATCH):
            self.client.log_batch(
                self.run_id,
                metrics=[e for e in chunk if isinstance(e, Metric)],
                params=[e for e in chunk if isinstance(e, Param)],
                tags=[e for e in chunk if isinstance(e, RunTag)],
            )


def resolve_uri(configured: str | None) -> str:
    """The tracking URI: configured, else $MLFLOW_TRACKING_URI, else outputs/mlflow.db. A
    relative SQLite path is made absolute, so every process of a sweep and a later resume
    from another folder reach the same file."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        uri = "sqlite:///" + str(Path(uri.removeprefix("sqlite:///")).absolute())
    return uri


def shown(uri: str) -> str:
    """``uri`` without a password, for messages."""
    parts = urllib.parse.urlsplit(uri)
    if parts.password:
        netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    return uri


def open_command(uri: str) -> str:
    """The command that shows the runs of ``uri``: a local store needs ``mlflow ui``, a
    server is opened in a browser."""
    if uri.startswith(("http://", "https://")):
        return f"open {uri} in a browser"
    return f"mlflow ui --backend-store-uri '{uri}'"


def connect(uri: str, timeout_s: float) -> Any:
    """An MlflowClient for ``uri``, after checking a server answers within ``timeout_s``."""
    for name, value in (
        ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2"),
        ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1"),
        ("MLFLOW_HTTP_REQUEST_TIMEOUT", str(max(1, math.ceil(timeout_s)))),
    ):
        os.environ.setdefault(name, value)
    if uri.startswith(("http://", "https://")):
        probe(uri, timeout_s)
    elif uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    from mlflow import MlflowClient  # configures its loggers: quieten them after

    for name in ("mlflow", "alembic"):  # schema creation and migration chatter
        logging.getLogger(name).setLevel(logging.WARNING)
    return MlflowClient(tracking_uri=uri)


def probe(uri: str, timeout_s: float) -> None:
    """TrackingUnavailable unless a server answers at ``uri`` (any HTTP status will do)."""
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s):
            pass
    except urllib.error.HTTPError:
        return  # it answered
    except (OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        if isinstance(reason, TimeoutError) or "timed out" in str(reason):
            reason = f"no answer within {timeout_s:g} s, tracker.mlflow.timeout_s"
        raise TrackingUnavailable(
            f"cannot reach the MLflow server {shown(uri)} ({reason})"
        ) from None


def experiment_id_for(client: Any, name: str, uri: str) -> str:
    """The id of experiment ``name``, created on first use. With a SQLite store its
    artifacts go to ``mlartifacts/`` beside the database file."""
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        location = None
        if uri.startswith("sqlite:///"):
            location = (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
        try:
            return client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)
        except MlflowException:  # another job created it first
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise
    if experiment.lifecycle_stage == "deleted":
        raise TrackingUnavailable(
            f"the MLflow experiment {name!r} is deleted; restore it or choose another with "
            "tracker.mlflow.experiment=NAME"
        )
    if not set(EXPERIMENT_KIND) & set(experiment.tags or {}):  # made before, or by others
        client.set_experiment_tag(experiment.experiment_id, *next(iter(EXPERIMENT_KIND.items())))
    return experiment.experiment_id


def flatten(node: Any, prefix: str = "", skip: Sequence[str] = ()) -> dict[str, str]:
    """{dotted key: value as text} of a plain config (lists as JSON), without the keys
    ``skip`` and Hydra's object keys (``OBJECT_KEYS``)."""
    out: dict[str, str] = {}
    if isinstance(node, dict):
        for k, v in node.items():
            key = f"{prefix}{k}"
            if key not in skip and k not in OBJECT_KEYS:
                out.update(flatten(v, f"{key}.", skip))
        return out
    key = prefix[:-1]
    out[key] = node if isinstance(node, str) else json.dumps(node)
    return out


def run_choices(choices: dict[str, str]) -> dict[str, str]:
    """The chosen options (loss=ntxent, data=digits, ...), Hydra's own and trackers left out."""
    return {
        group: str(option)
        for group, option in choices.items()
        if option is not None and not group.startswith("hydra") and group != "tracker"
    }


def final_metrics(results: dict[str, Any]) -> dict[str, float]:
    """The end-of-run numbers: evaluation, each baseline's (``raw_pixels.knn_k200``), times."""
    metrics = {k: v for k, v in (results.get("metrics") or {}).items() if is_number(v)}
    for baseline, values in (results.get("baselines") or {}).items():
        metrics.update({f"{baseline}.{k}": v for k, v in (values or {}).items() if is_number(v)})
    for key in ("train_time_s", "eval_time_s", "wall_time_s"):
        if is_number(results.get(key)):
            metrics[key] = results[key]
    if is_number(results.get("images_per_s")):
        metrics["train_images_per_s"] = results["images_per_s"]
    return metrics


def version_tags(found: dict[str, Any] | None = None) -> dict[str, str]:
    """contrast.version.* and the git commit, of ``found`` (results.json's) or this process."""
    from contrastive_cli.report import versions

    found = found if found is not None else versions()
    tags = {f"contrast.version.{k}": str(v) for k, v in found.items() if v and k != "git_sha"}
    if found.get("git_sha"):
        tags["contrast.git_sha"] = str(found["git_sha"])
        tags["mlflow.source.git.commit"] = str(found["git_sha"]).removesuffix("-dirty")
    return tags


def _user_tag() -> dict[str, str]:
    try:
        return {"mlflow.user": getpass.getuser()}
    except Exception:  # no user name in this environment (containers)
        return {}


def _chunks(items: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]

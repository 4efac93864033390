"""The experiment's saved view in MLflow's UI: the numbers people compare, first.

What a logger can and cannot control there (read from MLflow 3.17's UI code): the runs table
shows only the columns a person picks (by default Source, Models and Dataset: no metric), and
the chart view makes one chart per metric sorted by name; neither default can be set from
outside the browser. What can be written is a *saved view* (MLflow 3.15 and later): an
experiment tag ``mlflow.sharedViewState.<id>`` holding the page's state as JSON, which the UI
lists in the Runs page's **Views** menu and opens from
``#/experiments/<experiment id>/runs?viewStateShareKey=<id>``.

Ours, ``contrast: accuracy first``:

- columns: the headline k-NN accuracy (first of ``eval.knn_k``), the linear probe's top-1,
  the same k-NN of both baselines (raw pixels, random init), then the chosen loss, data and
  encoder; best run on top (sorted by the headline k-NN, descending);
- charts: a *Training* section first (loss per epoch, the monitor's k-NN, the step loss, the
  learning rate), then the final metrics as bars; charts of any other metric are appended
  after them by the UI itself.

The tag's value is the envelope MLflow's own "Save view" writes (``name``, ``createdAt``,
``updatedAt``, ``state``), with ``state`` the page state as plain JSON (the UI reads that as
well as the deflate-compressed form its own button writes). A view someone saved over ours in the UI is theirs: it is only
rewritten while it is still the one contrast wrote (``writtenBy``).
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

VIEW_ID = "contrast"
TAG = f"mlflow.sharedViewState.{VIEW_ID}"
NAME = "contrast: accuracy first"
WRITER = "contrast"
# What the training loop logs (MlflowTracker.log_epoch / log_step), in the order shown.
TRAINING = ("epoch_loss", "monitor_knn", "loss", "lr")
PARAMS = ("loss", "data", "encoder")  # the chosen options (MlflowTracker's run_choices)
BASELINES = ("raw_pixels", "random_init")
LOCAL_UI = "http://127.0.0.1:5000"  # where `mlflow ui` serves by default


def compared_metrics(config: dict[str, Any]) -> list[str]:
    """The metric names a run of ``config`` reports that people compare, headline first:
    ``knn_k200``, ``linear_top1``, then the baselines' ``raw_pixels.knn_k200``..."""
    evaluation = config.get("eval") or {}
    names = list(evaluation.get("metrics") or [])
    ks = list(evaluation.get("knn_k") or [])
    out = []
    if "knn" in names and ks:
        out.append(f"knn_k{ks[0]}")
    if "linear" in names:
        out.append("linear_top1")
    if evaluation.get("baselines") and out:
        out += [f"{baseline}.{out[0]}" for baseline in BASELINES]
    return out


def column(kind: str, key: str) -> str:
    """The runs table's id of a column (``metrics.`knn_k200```), as the UI spells it."""
    return f"{kind}.`{key}`"


def view_state(metrics: Sequence[str]) -> dict[str, Any]:
    """The page state of the view (the UI's ExperimentPageUIState and search facets)."""
    columns = [column("metrics", m) for m in metrics] + [column("params", p) for p in PARAMS]
    sections = [
        _section("contrast-training", "Training"),
        _section("contrast-results", "Model metrics"),  # the UI's own section for the rest
        _section("contrast-system", "System metrics"),
    ]
    charts = [_line(key, "contrast-training") for key in TRAINING]
    charts += [_bar(key, "contrast-results") for key in metrics]
    state: dict[str, Any] = {
        "selectedColumns": columns,
        "columnOrder": columns,
        "compareRunCharts": charts,
        "compareRunSections": sections,
        "isAccordionReordered": True,  # keep Training first
    }
    if metrics:
        state |= {"orderByKey": column("metrics", metrics[0]), "orderByAsc": False}
    return state


def _section(uuid: str, name: str) -> dict[str, Any]:
    # isReordered: charts of metrics not named here are appended, not sorted in among ours
    return {
        "uuid": uuid,
        "name": name,
        "display": True,
        "isReordered": True,
        "deleted": False,
        "isGenerated": False,
    }


def _card(kind: str, key: str, section: str) -> dict[str, Any]:
    return {
        "uuid": f"contrast-{kind.lower()}-{key}",
        "type": kind,
        "runsCountToCompare": 10,
        "metricSectionId": section,
        "deleted": False,
        "isGenerated": False,
        "metricKey": key,
    }


def _line(key: str, section: str) -> dict[str, Any]:
    return _card("LINE", key, section) | {
        "selectedMetricKeys": [key],
        "lineSmoothness": 0,
        "xAxisScaleType": "linear",
        "scaleType": "linear",
        "range": {},
        "xAxisKey": "step",  # the optimizer step: every metric is logged against it
        "selectedXAxisMetricKey": "",
        "yAxisKey": "metric",
        "yAxisExpressions": [],
        "ignoreOutliers": False,
        "useGlobalXaxisKey": True,
        "useGlobalLineSmoothing": True,
    }


def _bar(key: str, section: str) -> dict[str, Any]:
    return _card("BAR", key, section)


def envelope(state: dict[str, Any], created_ms: int, now_ms: int) -> str:
    """The tag's value, as MLflow's "Save view" writes it (savedViewEnvelope.ts)."""
    return json.dumps(
        {
            "name": NAME,
            "createdAt": created_ms,
            "updatedAt": now_ms,
            "state": json.dumps(state, separators=(",", ":")),
            "writtenBy": WRITER,
        },
        separators=(",", ":"),
    )


def write_view(client: Any, experiment_id: str, metrics: Sequence[str]) -> bool:
    """Write (or update) the view on the experiment; False when someone saved over it in the
    UI (theirs is kept) or it is already as written."""
    state = view_state(metrics)
    found = (client.get_experiment(experiment_id).tags or {}).get(TAG)
    now = int(time.time() * 1000)
    created = now
    if found is not None:
        try:
            old = json.loads(found)
            if old.get("writtenBy") != WRITER:
                return False
            if json.loads(old["state"]) == state:
                return False
            created = int(old["createdAt"])
        except (ValueError, KeyError, TypeError, AttributeError):
            return False  # not ours to repair
    client.set_experiment_tag(experiment_id, TAG, envelope(state, created, now))
    return True


def view_link(uri: str, experiment_id: str) -> str:
    """The address that opens the view: on the server of an http(s) URI, else on `mlflow ui`."""
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else LOCAL_UI
    return f"{base}/#/experiments/{experiment_id}/runs?viewStateShareKey={VIEW_ID}"

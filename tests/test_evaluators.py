"""Evaluators as plug-ins: chosen by ``eval.metrics``, one module each, one interface."""

from __future__ import annotations

import textwrap

import pytest
import torch
from torch import nn

import contrastive_cli.evaluators as evaluators
from contrastive_cli.errors import ConfigError
from contrastive_cli.evaluators import available, build_evaluators, evaluate_protocol
from contrastive_cli.evaluators.base import Features

SETTINGS = {
    "knn_k": [5, 2],
    "knn_temperature": 0.1,
    "probe": {"weight_decays": [1e-3], "val_fraction": 0.2, "max_iter": 20},
}


def images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    x = torch.randint(0, 60, (n, 1, 2, 2), generator=g, dtype=torch.uint8) + 60 * labels.view(
        -1, 1, 1, 1
    ).to(torch.uint8)
    return x, labels


def protocol(names: list[str]) -> dict[str, dict[str, float]]:
    (train_x, train_y), (test_x, test_y) = images(60, 0), images(30, 1)
    encoder = nn.Flatten()
    return evaluate_protocol(
        {"trained": encoder},
        train_x,
        train_y,
        test_x,
        test_y,
        3,
        lambda x: x.float() / 255,
        torch.device("cpu"),
        build_evaluators(names, SETTINGS, seed=0),
        batch_size=16,
    )


def test_the_shipped_evaluators_and_their_interface():
    assert available() == [
        "alignment",
        "knn",
        "linear",
        "lowshot",
        "rankme",
        "retrieval",
        "uniformity",
    ]
    knn, linear = build_evaluators(["knn", "linear"], SETTINGS, seed=0)
    assert (knn.name, knn.needs_labels, linear.name, linear.needs_labels) == (
        "knn",
        True,
        "linear",
        True,
    )
    x = torch.eye(3).repeat(4, 1)
    y = torch.arange(3).repeat(4)
    assert knn(Features(x, y, x, y, 3)) == {"knn_k5": 1.0, "knn_k2": 1.0}


def test_eval_metrics_chooses_what_runs_and_what_results_hold():
    both = protocol(["knn", "linear"])
    assert list(both["trained"]) == [
        "knn_k5",
        "knn_k2",
        "linear_top1",
        "probe_weight_decay",
        "seconds",
    ]
    assert set(both) == {"raw_pixels", "trained"}
    only_knn = protocol(["knn"])
    assert list(only_knn["trained"]) == ["knn_k5", "knn_k2", "seconds"]
    assert only_knn["trained"]["knn_k5"] == both["trained"]["knn_k5"]  # same numbers alone


def test_an_unknown_evaluator_is_one_line_naming_the_known_ones():
    with pytest.raises(ConfigError) as e:
        build_evaluators(["knn", "lidar"], SETTINGS, seed=0)
    message = str(e.value)
    assert "eval.metrics=['knn', 'lidar'] is not allowed" in message and "\n" not in message
    assert "allowed: a list of alignment, knn, linear, lowshot" in message


def test_a_new_evaluator_is_one_module_and_its_name(tmp_path, monkeypatch):
    """What docs/architecture.md shows: a module with ``make`` in the evaluators package."""
    (tmp_path / "mean_norm.py").write_text(
        textwrap.dedent(
            """
            from contrastive_cli.evaluators.base import Features

            class MeanNorm:
                name = "mean_norm"
                needs_labels = False

                def __call__(self, f: Features) -> dict[str, float]:
                    return {"mean_norm": f.test_x.norm(dim=1).mean().item()}

            def make(settings, seed):
                return MeanNorm()
            """
        )
    )
    monkeypatch.setattr(evaluators, "__path__", [*evaluators.__path__, str(tmp_path)])
    assert "mean_norm" in available()
    result = protocol(["knn", "mean_norm"])["trained"]
    assert set(result) == {"knn_k5", "knn_k2", "mean_norm", "seconds"}


def test_the_results_table_shows_what_any_evaluator_returned():
    from contrastive_cli.report import results_table

    metrics = {"knn_k200": 0.9, "linear_top1": 0.95, "probe_weight_decay": 1e-4, "seconds": 2.0}
    table = results_table({"loss": "ntxent", "metrics": {**metrics, "mean_norm": 1.5}})
    header = table.splitlines()[0]
    assert "k-NN k=200" in header and "linear" in header and "mean_norm" in header
    assert "probe_weight_decay" not in header and "seconds" not in header
    assert "mean_norm" not in results_table({"loss": "ntxent", "metrics": metrics})

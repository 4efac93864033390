"""Progress while a person waits (contrastive_cli.progress): timestamped lines every
``trainer.log_every_s`` seconds off a terminal, tqdm bars on one; in the training epochs,
feature extraction, the evaluators and probe fits, the embedding map and tracker start-up."""

from __future__ import annotations

import io
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from contrastive_cli import progress
from contrastive_cli.callbacks.progress import ProgressBar
from contrastive_cli.evaluate import linear_probe
from contrastive_cli.evaluators import build_evaluators, evaluate_protocol
from contrastive_cli.events import StepEnd
from contrastive_cli.progress import task
from contrastive_cli.tracking import Trackers

STAMP = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d ")
EVERY_S = 0.02


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def often():
    """Lines every EVERY_S seconds on the test's stderr (captured: not a terminal)."""
    progress.configure(EVERY_S)
    yield
    progress.configure()


def lines(capsys) -> list[str]:
    err = capsys.readouterr().err
    found = [ln for ln in err.splitlines() if ln.strip()]
    assert all(STAMP.match(ln) for ln in found), err  # every line carries its time
    return found


def test_off_a_terminal_a_timestamped_line_every_interval_and_none_for_quick_work(capsys):
    with task("quick"):
        pass
    assert lines(capsys) == []
    with task("copying", total=4, unit="file") as t:
        t.update(3)
        t.note(size="12 MB")
        time.sleep(10 * EVERY_S)
    found = lines(capsys)
    assert len(found) >= 3
    assert found[-1].endswith(" copying: 3/4 files (75%), 0 s, size 12 MB"), found


def test_nested_tasks_print_only_the_innermost_prefixed_by_the_outer(capsys):
    with task("trained encoder: linear"):
        with task("probe fits", total=2, unit="fit"):
            time.sleep(10 * EVERY_S)
        found = lines(capsys)
        time.sleep(10 * EVERY_S)
    assert found and all("trained encoder: linear: probe fits: 0/2 fits" in ln for ln in found)
    assert any("trained encoder: linear: running" in ln for ln in lines(capsys))


def test_on_a_terminal_a_bar_and_no_lines():
    term = Terminal()
    progress.configure(EVERY_S, stream=term)
    bar = ProgressBar(log_every=1)
    loop = _loop()
    bar.epoch_start(loop)
    loop.progress.batch = 1
    bar.step_end(loop, StepEnd(torch.tensor(1.5)))
    time.sleep(10 * EVERY_S)
    bar.epoch_end(loop, {})
    text = term.getvalue()
    assert "epoch 1/2" in text and "loss=1.5000" in text and "\r" in text  # tqdm's bar
    assert not any(STAMP.match(ln) for ln in text.replace("\r", "\n").splitlines())


def test_training_epochs_off_a_terminal_give_lines_with_the_loss(capsys):
    bar, loop = ProgressBar(log_every=1), _loop()
    bar.epoch_start(loop)
    loop.progress.batch = 1
    bar.step_end(loop, StepEnd(torch.tensor(2.25)))
    time.sleep(10 * EVERY_S)
    bar.epoch_end(loop, {})
    found = lines(capsys)
    assert found and "epoch 1/2: 1/3 steps (33%)" in found[-1] and "loss 2.2500" in found[-1]


class Slow(nn.Module):
    """An encoder that takes its time, so its feature extraction shows progress."""

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(16, 4)

    def forward(self, x):
        time.sleep(5 * EVERY_S)
        return self.linear(x.flatten(1))


def test_evaluation_shows_features_and_each_evaluator_by_entry(capsys):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (40, 1, 4, 4), dtype=torch.uint8, generator=g)
    labels = torch.arange(40) % 2
    settings = {"knn_k": [5], "knn_temperature": 0.1, "probe": {"weight_decays": [1e-3]}}
    results = evaluate_protocol(
        {"trained": Slow()},
        images,
        labels,
        images[:20],
        labels[:20],
        2,
        lambda x: x.float() / 255,
        torch.device("cpu"),
        build_evaluators(["knn", "linear"], settings, 0),
        batch_size=10,
        pixels=False,
    )
    assert set(results["trained"]) >= {"knn_k5", "linear_top1"}
    text = "\n".join(lines(capsys))
    assert "trained encoder: features of train images: " in text and "/40 images" in text
    assert "trained encoder: features of test images: " in text


def test_probe_fits_are_counted(capsys, monkeypatch):
    import contrastive_cli.evaluate as evaluate

    fit = evaluate.fit_logistic

    def slow_fit(*args, **kwargs):
        time.sleep(5 * EVERY_S)
        return fit(*args, **kwargs)

    monkeypatch.setattr(evaluate, "fit_logistic", slow_fit)
    x, y = torch.randn(30, 3), torch.arange(30) % 3
    linear_probe(x, y, x, y, 3, weight_decays=(1e-3, 1e-2), max_iter=5)
    text = "\n".join(lines(capsys))
    assert "probe fits: 0/3 fits" in text and "probe fits: 2/3 fits" in text
    assert "refit weight decay" in text


def test_the_embedding_map_and_tracker_start_show_progress(capsys, tmp_path: Path):
    from contrastive_cli.plots import plot_embedding

    rng = np.random.default_rng(0)
    plot_embedding(rng.normal(size=(40, 5)), np.arange(40) % 2, tmp_path / "e.png", "t")
    assert any("2-D map (UMAP or t-SNE) of 40 test features: running" in ln for ln in lines(capsys))

    class Sluggish:
        name = "sluggish"

        def start(self, *args):
            time.sleep(10 * EVERY_S)

    Trackers([Sluggish()]).start(tmp_path, {}, {}, False)  # type: ignore[list-item]
    assert any("starting tracker=sluggish: running" in ln for ln in lines(capsys))


def _loop():
    from tests.test_callbacks import fake_loop

    return fake_loop()


def test_the_first_line_comes_once_the_names_are_right_and_never_for_a_typo(capsys):
    from contrastive_cli.command_line import check_command_line
    from contrastive_cli.commands.train import _announce
    from contrastive_cli.errors import ConfigError

    seen = []
    check_command_line(["loss=byol", "trainer.epochs=1"], seen.append)
    assert len(seen) == 1
    _announce(seen[0])
    assert capsys.readouterr().out.startswith("starting byol on digits: importing torch")
    with pytest.raises(ConfigError, match=r"trainer\.epoch "):
        check_command_line(["trainer.epoch=1"], seen.append)
    assert len(seen) == 1

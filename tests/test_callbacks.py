"""The loop's events and each callback alone, on a fake run: a toy method, a few batches of
random images, no data set, no files but the ones a callback writes."""

from __future__ import annotations

import logging
import signal

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from contrastive_cli.callbacks.budget import TimeBudget
from contrastive_cli.callbacks.checkpointing import Checkpointing
from contrastive_cli.callbacks.divergence import Divergence
from contrastive_cli.callbacks.metrics_file import MetricsFile
from contrastive_cli.callbacks.monitor import Monitor
from contrastive_cli.callbacks.progress import EpochLine, ProgressBar
from contrastive_cli.callbacks.signals import Signals
from contrastive_cli.callbacks.trackers import TrackerLog
from contrastive_cli.checkpoint import load_checkpoint
from contrastive_cli.device import Runtime
from contrastive_cli.distributed import SINGLE
from contrastive_cli.errors import Diverged
from contrastive_cli.events import Callback, Loop, Progress, StepEnd
from contrastive_cli.record import ConfigRecord
from contrastive_cli.report import MetricsLog, read_metrics
from contrastive_cli.schedule import warmup_cosine
from contrastive_cli.signals import GracefulStop, Interrupted
from contrastive_cli.train import Training, train

STEPS = 3  # per epoch


class Toy(nn.Module):
    """A method the loop can train: an encoder, a loss of the views, ``after_step``."""

    def __init__(self, nan_at: int = 0):
        super().__init__()
        self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(4, 2))
        self.calls, self.nan_at = 0, nan_at

    def forward(self, views, labels=None):
        self.calls += 1
        loss = sum(self.encoder(v).pow(2).mean() for v in views)
        return loss * float("nan") if self.calls == self.nan_at else loss

    def after_step(self, step: int, total_steps: int) -> None:
        pass


class FakeBatches:
    batch_size = 4
    shard = (0, 4)

    def __len__(self):
        return STEPS

    def epoch(self, epoch, start=0):
        g = torch.Generator().manual_seed(epoch)
        for _ in range(start, STEPS):
            yield torch.randint(0, 256, (4, 1, 2, 2), generator=g, dtype=torch.uint8), None


class FakeAugment:
    def views(self, images, generator, rows=None):
        x = images.float() / 255
        return [x, x.flip(0)]


RUNTIME = Runtime(torch.device("cpu"), False, False, False, True)


def training(nan_at: int = 0, epochs: int = 2) -> Training:
    method = Toy(nan_at)
    optimizer = torch.optim.SGD(method.parameters(), lr=0.1)
    scheduler = warmup_cosine(optimizer, steps_per_epoch=STEPS, epochs=epochs, warmup_epochs=0)
    return Training(method, method, optimizer, scheduler, FakeBatches())


def fake_loop(epochs: int = 2, progress: Progress | None = None) -> Loop:
    t = training(epochs=epochs)
    return Loop(t.method, t.optimizer, t.scheduler, STEPS, 4, epochs, progress or Progress())


class Recorder(Callback):
    def __init__(self):
        self.events: list[str] = []

    def run_start(self, loop):
        self.events.append("run_start")

    def epoch_start(self, loop):
        self.events.append("epoch_start")

    def step_end(self, loop, step):
        self.events.append("step_end")

    def epoch_end(self, loop, record):
        self.events.append("epoch_end")

    def stop_requested(self, loop):
        self.events.append("stop_requested")

    def run_end(self, loop, error):
        self.events.append(f"run_end {type(error).__name__}")


# --------------------------------------------------------------------------- the loop's events
def test_the_loop_emits_its_events_in_order():
    rec = Recorder()
    progress = train(training(), FakeAugment(), RUNTIME, 2, 0, Progress(), [rec])
    epoch = ["epoch_start", *["step_end"] * STEPS, "epoch_end"]
    assert rec.events == ["run_start", *epoch, *epoch, "run_end NoneType"]
    assert (progress.epoch, progress.step, progress.batch) == (2, 2 * STEPS, 0)


def test_a_stop_request_ends_the_epoch_after_its_step():
    class StopAtTwo(Recorder):
        def __init__(self):
            super().__init__()
            self.loop = None

        def run_start(self, loop):
            self.loop = loop
            super().run_start(loop)

        def wants_stop(self):
            return self.loop.progress.step == 1  # polled during step 2

    rec = StopAtTwo()
    progress = train(training(), FakeAugment(), RUNTIME, 2, 0, Progress(), [rec])
    assert rec.events[-3:] == ["step_end", "stop_requested", "run_end NoneType"]
    assert (progress.epoch, progress.step, progress.batch, len(progress.step_losses)) == (
        0,
        2,
        2,
        2,
    )


def test_a_diverged_step_reaches_run_end_with_the_error():
    rec = Recorder()
    with pytest.raises(Diverged):
        train(training(nan_at=2), FakeAugment(), RUNTIME, 2, 0, Progress(), [rec])
    assert rec.events[-1] == "run_end Diverged"
    assert rec.events.count("step_end") == 1  # the diverged step is not applied


def test_a_callback_may_change_the_epoch_count():
    class OneMore(Callback):
        def epoch_end(self, loop, record):
            if loop.progress.epoch == 1:
                loop.epochs = 3

    progress = train(training(), FakeAugment(), RUNTIME, 2, 0, Progress(), [OneMore()])
    assert progress.epoch == 3


# --------------------------------------------------------------------------- callbacks alone
def test_monitor_runs_every_n_epochs_and_after_the_last():
    loop, seen = fake_loop(epochs=5), []
    monitor = Monitor(lambda encoder: seen.append(encoder) or 0.5, every=2)
    for epoch in range(1, 6):
        loop.progress.epoch = epoch
        record: dict = {}
        monitor.epoch_end(loop, record)
        assert ("knn" in record) == (epoch in (2, 4, 5))
    assert seen[0] is loop.method.encoder


def test_the_time_budget_fixes_the_epochs_without_touching_the_users_config(caplog):
    cfg = OmegaConf.create(
        {"trainer": {"epochs": "${n}", "time_budget": "1h", "seed": 0}, "n": 100}
    )
    record = ConfigRecord(cfg)
    saved = []
    budget = TimeBudget("1h", SINGLE, lambda n: saved.append(record.fix_epochs(n)))
    loop = fake_loop(epochs=100)
    budget.run_start(loop)
    budget.started -= 10.0  # the first epoch "took" 10 s
    loop.progress.epoch = 1
    entry = {"epoch_time_s": 10.0, "first_step_s": 0.0}
    with caplog.at_level(logging.INFO):
        budget.epoch_end(loop, entry)
    assert "first_step_s" not in entry  # for the budget only, never logged
    # 10 s first epoch, steady 10 + 10 / (3 - 1) = 15 s: 1 + (3600 - 10) // 15 = 240
    assert 235 <= loop.epochs <= 240
    assert cfg.trainer.epochs == 100 and cfg.trainer.time_budget == "1h"  # unchanged
    assert record.resolved["trainer"] == {"epochs": loop.epochs, "time_budget": None, "seed": 0}
    assert record.epochs == loop.epochs
    assert saved[0].trainer.epochs == loop.epochs and saved[0].trainer.time_budget is None
    lambdas = loop.scheduler.lr_lambdas
    assert lambdas[0].total_steps == loop.epochs * STEPS
    assert "so" in caplog.text and f"{loop.epochs} epochs" in caplog.text
    loop.progress.epoch = 2  # only once
    budget.epoch_end(loop, {"epoch_time_s": 1.0})
    assert len(saved) == 1


def test_without_a_budget_it_only_drops_the_first_step_time():
    budget = TimeBudget(None, SINGLE, lambda n: pytest.fail("no budget"))
    loop = fake_loop()
    loop.progress.epoch = 1
    entry = {"epoch_time_s": 1.0, "first_step_s": 0.5}
    budget.epoch_end(loop, entry)
    assert entry == {"epoch_time_s": 1.0} and loop.epochs == 2


def test_checkpointing_saves_each_epoch_when_asked_and_always_on_a_stop(tmp_path):
    record = ConfigRecord(OmegaConf.create({"trainer": {"epochs": 2}}))
    path = tmp_path / "last.pt"
    loop = fake_loop()
    Checkpointing(lambda: path, record, every_epoch=False).epoch_end(loop, {})
    assert not path.exists()
    loop.progress.step = 5
    Checkpointing(lambda: path, record, every_epoch=False).stop_requested(loop)
    state = load_checkpoint(path)
    assert state["progress"]["step"] == 5 and state["config"] == record.resolved
    assert state["config_digest"] == record.digest
    assert {"method", "optimizer", "scheduler", "progress", "config", "config_digest"} <= set(state)
    path.unlink()
    Checkpointing(lambda: path, record, every_epoch=True).epoch_end(loop, {})
    assert path.exists()


def test_signals_ask_for_a_stop_report_it_and_raise():
    stop, reports = GracefulStop(), []
    cb = Signals(stop, "RUN", lambda status, loop, error: reports.append((status, error)))
    loop = fake_loop()
    cb.run_start(loop)
    assert stop.graceful and not cb.wants_stop()
    stop.signum = signal.SIGTERM
    assert cb.wants_stop()
    loop.progress.step = 4
    with pytest.raises(Interrupted) as e:
        cb.stop_requested(loop)
    assert e.value.exit_code == 143
    assert reports == [("interrupted", str(e.value))] and "contrast resume RUN" in str(e.value)
    cb.run_end(loop, e.value)
    assert not stop.graceful


def test_divergence_reports_a_diverged_run_only():
    reports = []
    cb = Divergence(lambda status, loop, error: reports.append((status, error)))
    cb.run_end(fake_loop(), None)
    cb.run_end(fake_loop(), KeyboardInterrupt())
    cb.run_end(fake_loop(), Diverged(3, float("nan"), 1.0))
    assert [s for s, _ in reports] == ["diverged"]


def test_metrics_file_trackers_and_the_epoch_line(tmp_path, caplog):
    class FakeTrackers:
        def __init__(self):
            self.steps, self.epochs = [], []

        def log_step(self, step, values):
            self.steps.append((step, values))

        def log_epoch(self, record):
            self.epochs.append(record)

    loop = fake_loop()
    trackers = FakeTrackers()
    tracker_log = TrackerLog(trackers, log_every=2)
    for batch in (1, 2, 3):
        loop.progress.batch, loop.progress.step = batch, batch
        tracker_log.step_end(loop, StepEnd(torch.tensor(float(batch))))
    assert trackers.steps == [(2, {"loss": 2.0, "lr": loop.lr})]

    entry = {"epoch": 1, "step": 3, "loss": 1.5, "lr": 0.1, "images_per_s": 10.0, "knn": 0.5}
    loop.progress.epoch, loop.progress.train_seconds = 1, 4.0
    MetricsFile(MetricsLog(tmp_path / "metrics.jsonl")).epoch_end(loop, entry)
    tracker_log.epoch_end(loop, entry)
    with caplog.at_level(logging.INFO):
        EpochLine().epoch_end(loop, entry)
    assert read_metrics(tmp_path / "metrics.jsonl") == [entry] and trackers.epochs == [entry]
    assert "epoch 1/2  step 3  loss 1.5000" in caplog.text and "knn 0.5000" in caplog.text
    assert "~4 s of training left" in caplog.text


def test_the_progress_bar_opens_and_closes_with_each_epoch():
    loop, bar = fake_loop(), ProgressBar(log_every=1)
    bar.epoch_start(loop)
    loop.progress.batch = 1
    bar.step_end(loop, StepEnd(torch.tensor(1.0)))
    assert bar.bar is not None  # (disabled off a terminal, as in the CLI)
    bar.epoch_end(loop, {})
    assert bar.bar is None


def test_a_step_loss_is_read_from_the_device_once():
    step = StepEnd(torch.tensor(2.0))
    assert step.loss_value == 2.0
    step.loss = None  # a second read uses the value already taken
    assert step.loss_value == 2.0

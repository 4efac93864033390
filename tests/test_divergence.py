"""A non-finite loss never reaches the weights: the run stops with status `diverged`."""

from __future__ import annotations

import json
import math

import pytest
import torch

from contrastive_cli.config import build
from contrastive_cli.data.batches import InMemoryBatches
from contrastive_cli.errors import Diverged
from contrastive_cli.events import Callback
from contrastive_cli.methods.simclr import SimCLR
from contrastive_cli.parts import build_encoder, load_data
from contrastive_cli.run import run_training
from contrastive_cli.train import Progress, Training, train
from tests.conftest import TINY

K = 7  # the step whose loss is forced to NaN


def _nan_at_step(monkeypatch, k):
    original = SimCLR.forward
    calls = {"n": 0}

    def forward(self, views, labels=None):
        calls["n"] += 1
        loss = original(self, views, labels)
        return loss * math.nan if calls["n"] == k else loss

    monkeypatch.setattr(SimCLR, "forward", forward)


def _built(cfg):
    runtime = build(cfg.device)
    data = load_data(cfg)
    method = build(cfg.loss, encoder=build_encoder(cfg, cfg.trainer.seed))
    optimizer = build(cfg.optim.optimizer)(list(method.parameters()))
    batches = InMemoryBatches(
        data.pretrain, cfg.trainer.batch_size, cfg.trainer.seed, runtime.device
    )
    scheduler = build(cfg.optim.scheduler)(
        optimizer, steps_per_epoch=len(batches), epochs=cfg.trainer.epochs
    )
    return method, optimizer, scheduler, batches, build(cfg.data.augment), runtime


class _StopWhen(Callback):
    """Asks for a stop when ``when()`` says so; the stop then raises StopIteration."""

    def __init__(self, when):
        self.when = when

    def wants_stop(self):
        return self.when()

    def stop_requested(self, loop):
        raise StopIteration


def _train(cfg, callbacks):
    method, optimizer, scheduler, batches, augment, runtime = _built(cfg)
    try:
        train(
            Training(method, method, optimizer, scheduler, batches),
            augment,
            runtime,
            cfg.trainer.epochs,
            cfg.trainer.seed,
            Progress(),
            callbacks,
        )
    except (Diverged, StopIteration) as e:
        return method, optimizer, e
    return method, optimizer, None


def test_nan_at_step_k_leaves_the_weights_of_step_k_minus_1(compose_cfg, monkeypatch):
    cfg = compose_cfg(*TINY)
    # Reference: stop cleanly after K-1 steps.
    progress_steps = {"n": 0}

    def stop_after_k_minus_1():
        progress_steps["n"] += 1
        return progress_steps["n"] >= K - 1

    ref_method, ref_opt, stopped = _train(
        cfg,
        [_StopWhen(stop_after_k_minus_1)],
    )
    assert isinstance(stopped, StopIteration)

    _nan_at_step(monkeypatch, K)
    method, opt, error = _train(cfg, [])
    assert isinstance(error, Diverged) and error.step == K
    for (name, a), b in zip(
        method.state_dict().items(), ref_method.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name
    assert all(torch.isfinite(p).all() for p in method.parameters())
    assert opt.state_dict()["state"].keys() == ref_opt.state_dict()["state"].keys()


def test_diverged_run_reports_status_and_keeps_the_last_good_checkpoint(
    compose_cfg, monkeypatch, tmp_path
):
    cfg = compose_cfg(*TINY)
    steps_per_epoch = 1437 // 64
    _nan_at_step(monkeypatch, steps_per_epoch + 3)  # early in the second epoch
    with pytest.raises(Diverged, match=r"lower optim\.optimizer\.lr"):
        run_training(cfg, tmp_path, {"loss": "ntxent"})
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["status"] == "diverged" and results["epoch"] == 1
    state = torch.load(tmp_path / "checkpoints" / "last.pt", weights_only=True)
    assert state["progress"]["epoch"] == 1 and state["progress"]["step"] == steps_per_epoch
    assert not (tmp_path / "encoder.safetensors").exists()

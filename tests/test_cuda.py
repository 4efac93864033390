"""The GPU path, run on the device the GPU check names (``benchmarks/gpu_check.sh``).

Marked ``cuda``: on a machine without a GPU they skip, unless ``CONTRAST_CHECK_DEVICE=cpu``
asks for them on the CPU, which is how the check script is rehearsed before the one GPU call
(``DEVICE=cpu bash benchmarks/gpu_check.sh``, run by tests/test_gpu_check.py). Each case uses
the real command in a subprocess, so what is proven is what a user runs.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch

from contrastive_cli.commands.reproduce import compared_values
from contrastive_cli.config import config_groups
from tests.conftest import REPO, TINY, read_results, run_cli, run_dirs

DEVICE = os.environ.get("CONTRAST_CHECK_DEVICE", "cuda")
LOSSES = config_groups()["loss"]  # every conf/loss option

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(
        DEVICE == "cuda" and not torch.cuda.is_available(),
        reason="no CUDA GPU here (CONTRAST_CHECK_DEVICE=cpu runs these on the CPU)",
    ),
]
SMALL = [*TINY, "trainer.epochs=1", f"device={DEVICE}", "eval.plots=false"]


def losses_of(run) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_every_loss_trains_and_evaluates_on_the_device(tmp_path):
    """One sweep over every loss: each job completes with finite losses and metrics, on the
    device asked for, at its precision (bf16 autocast on CUDA from Ampere)."""
    run_cli(["train", "-m", f"loss={','.join(LOSSES)}", *SMALL], cwd=tmp_path, check=True)
    runs = run_dirs(tmp_path / "outputs")
    assert len(runs) == len(LOSSES)
    for run in runs:
        results = read_results(run)
        assert results["status"] == "completed", run.name
        assert all(math.isfinite(v) for v in losses_of(run)), run.name
        assert 0.0 <= results["metrics"]["knn_k200"] <= 1.0, run.name
        device = results["device"]
        if DEVICE == "cuda":
            assert torch.cuda.get_device_name(0) in device, device
            assert "bf16" in device and "channels_last" in device, device
        else:
            assert device.startswith("cpu"), device


def test_deterministic_rerun_is_bit_identical(tmp_path):
    """trainer.deterministic=true: the same config twice gives the same per-epoch losses and
    metrics, bit for bit (the reproducibility contract, on this device)."""
    args = ["train", *SMALL, "trainer.epochs=2", "trainer.deterministic=true", "loss=moco"]
    run_cli([*args, "hydra.run.dir=outputs/a"], cwd=tmp_path, check=True)
    run_cli([*args, "hydra.run.dir=outputs/b"], cwd=tmp_path, check=True)
    a, b = tmp_path / "outputs/a", tmp_path / "outputs/b"
    assert losses_of(a) == losses_of(b)
    assert compared_values(a) == compared_values(b)  # per-epoch values and metrics, not timings


def test_compiled_method_trains(tmp_path):
    """device.compile=true (torch.compile of the method) runs a whole epoch and evaluation."""
    run_cli(["train", *SMALL, "device.compile=true"], cwd=tmp_path, check=True)
    [run] = run_dirs(tmp_path / "outputs")
    results = read_results(run)
    assert results["status"] == "completed"
    assert "compile" in results["device"]
    assert all(math.isfinite(v) for v in losses_of(run))


def test_a_device_run_killed_mid_epoch_resumes_on_the_cpu(tmp_path):
    """A run killed (SIGKILL) in its second epoch resumes from the checkpoint written on the
    device with device=cpu (tensors mapped, no CUDA state needed) and completes."""
    run = tmp_path / "outputs/r"
    args = ["train", *SMALL, "trainer.epochs=2", f"hydra.run.dir={run}"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"}
    steps = -(-1437 // 64)  # digits' training split at batch 64 (a partial last batch kept or not)
    killed = subprocess.run(
        [sys.executable, "-m", "tests.harness", "kill-in-step", str(steps + 3), "--", *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    assert len(losses_of(run)) == 1  # the first epoch, checkpointed
    run_cli(["resume", str(run), "device=cpu"], cwd=tmp_path, check=True)
    results = read_results(run)
    assert results["status"] == "completed"
    assert results["device"].startswith("cpu")
    assert len(losses_of(run)) == 2

"""What a user of `contrast train trainer.devices=2` sees when one worker fails, when the
group restarts, and on Ctrl-C while the workers start: the failing rank's own error on the
console (one line), its traceback in train.log, results.json ``failed`` with the rank.

The fault is injected into one rank (tests/faults.py, chosen by CONTRAST_FAULT_RANK); two
CPU processes on gloo, one short epoch of digits.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, TINY, read_results, run_cli

CFG = [o for o in TINY if not o.startswith(("trainer.epochs", "trainer.batch_size"))] + [
    "trainer.epochs=1",
    "trainer.batch_size=128",  # 11 steps
    "eval.plots=false",
    "eval.baselines=false",
    "eval.probe.max_iter=5",
    "device=cpu",
    "trainer.devices=2",
]
CRASH = "tests.faults.CrashingSimCLR"
NO_DATA = "tests.faults.digits_failing_on_one_rank"


def _lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if ln.strip()]


# --------------------------------------------------------------------------- which rank is the cause
def test_a_crash_is_the_cause_even_when_another_rank_reported_lost_contact_first(tmp_path):
    from contrastive_cli import failures

    failures.report(tmp_path, 0, 0, "lost", "lost contact with another process (gloo)", 1)
    try:
        raise RuntimeError("boom")
    except RuntimeError as e:
        failures.report(tmp_path, 0, 1, "crash", "RuntimeError: boom", 1, e)
    lost = tmp_path / "attempt0-rank0.json"  # rank 0's report is the earlier one
    lost.write_text(json.dumps({**json.loads(lost.read_text()), "time": 0.0}))
    failure = failures.first_failure({0: 1, 1: 1}, tmp_path, 0, 2)
    assert (failure.rank, failure.reason) == (1, "RuntimeError: boom")
    assert "raise RuntimeError" in failure.traceback
    assert failure.consequences == ("rank 0 of 2 lost contact with another process (gloo)",)


def test_the_killed_rank_is_the_cause_not_the_ranks_the_launcher_stopped(tmp_path):
    from contrastive_cli import failures

    sigkill, sigterm = -int(signal.SIGKILL), -int(signal.SIGTERM)
    failure = failures.first_failure({0: sigterm, 1: sigkill, 2: 143}, tmp_path, 0, 3)
    assert (failure.rank, failure.reason) == (1, "was killed by SIGKILL")
    assert failure.consequences == (
        "rank 0 of 3 was killed by SIGTERM",
        "rank 2 of 3 was stopped by SIGTERM",
    )
    assert failures.first_failure({0: 130, 1: -int(signal.SIGINT)}, tmp_path, 0, 2).interrupted


def test_only_the_last_attempts_reports_count(tmp_path):
    """After a restart, what the first attempt's ranks said is history, not the cause."""
    from contrastive_cli import failures

    failures.report(tmp_path, 0, 0, "error", "first attempt's error", 1)
    failures.report(tmp_path, 1, 1, "error", "no such folder", 1)
    failure = failures.first_failure({0: 143, 1: 1}, tmp_path, 1, 2)
    assert (failure.rank, failure.reason) == (1, "no such folder")


# --------------------------------------------------------------------------- the CLI, two processes
def test_a_worker_that_raises_is_named_with_its_error_and_traceback(tmp_path):
    """Rank 1 raises at its 2nd step; rank 0 then loses contact: a consequence, not the cause."""
    run = tmp_path / "run"
    proc = run_cli(
        ["train", *CFG, f"loss._target_={CRASH}", f"hydra.run.dir={run}"],
        cwd=tmp_path,
        env={
            "CONTRAST_EXTRA_TARGETS": f"loss={CRASH}",
            "CONTRAST_FAULT_RANK": "1",
            "CONTRAST_FAULT_STEP": "2",
        },
        timeout=300,
    )
    lines = _lines(proc.stderr)
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(
        "error: rank 1 of 2 failed: RuntimeError: injected fault at step 2 (traceback in"
    )
    assert "contrast resume" in lines[0] and "lost contact" not in lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout
    log = (run / "train.log").read_text()
    assert "rank 1's traceback:\nTraceback (most recent call last):" in log
    assert 'tests/faults.py", line' in log and "RuntimeError: injected fault at step 2" in log
    assert "as a consequence, rank 0 of 2 " in log
    results = read_results(run)
    assert results["status"] == "failed" and results["failed_rank"] == 1
    assert results["error"] == "rank 1 of 2 failed: RuntimeError: injected fault at step 2"


def test_a_data_error_on_one_rank_is_a_failure_of_that_rank_through_a_restart(tmp_path):
    """Rank 1 cannot load its data in both attempts (trainer.max_restarts=1): the restart is
    recorded, the console names rank 1 (not the rank that lost contact), results.json is
    failed (not the "interrupted" rank 0 wrote when the launcher stopped it)."""
    run = tmp_path / "run"
    proc = run_cli(
        [
            "train",
            *CFG,
            "trainer.max_restarts=1",
            f"data.source._target_={NO_DATA}",
            f"hydra.run.dir={run}",
        ],
        cwd=tmp_path,
        env={
            "CONTRAST_EXTRA_TARGETS": f"data.source={NO_DATA}",
            "CONTRAST_FAULT_RANK": "1",
            "CONTRAST_FAULT_EVERY_ATTEMPT": "1",
        },
        timeout=300,
    )
    lines = _lines(proc.stderr)
    error = "/data/on/this/node: no such folder (injected on one rank)"
    assert proc.returncode == 1 and lines == [f"error: {error} (rank 1 of 2)"], proc.stderr
    assert "Traceback" not in proc.stdout
    assert f"restart 1 of 1: rank 1 of 2 failed: {error}" in proc.stdout
    log = (run / "train.log").read_text()
    restarted = log.index(f"restart 1 of 1: rank 1 of 2 failed: {error}; the 2 processes")
    assert restarted < log.index(f"error: {error} (rank 1 of 2)")
    results = read_results(run)
    assert results["status"] == "failed" and results["failed_rank"] == 1
    assert results["error"] == f"rank 1 of 2 failed: {error}"
    [restart] = results["restarts"]
    assert restart["failed_rank"] == 1 and restart["reason"] == error
    assert (restart["restart"], restart["resumed_from_step"]) == (1, 0)


@pytest.mark.slow  # restarts are recorded in make test by test_multiprocess_cli
def test_a_worker_crash_with_a_restart_left_is_recorded_and_the_run_completes(tmp_path):
    """Rank 1 raises in epoch 2 of the first attempt; the group restarts from epoch 1's
    checkpoint and finishes; results.json, train.log and the console say so."""
    run = tmp_path / "run"
    proc = run_cli(
        [
            "train",
            *[o for o in CFG if o != "trainer.epochs=1"],
            "trainer.epochs=2",
            "trainer.max_restarts=1",
            f"loss._target_={CRASH}",
            f"hydra.run.dir={run}",
        ],
        cwd=tmp_path,
        env={
            "CONTRAST_EXTRA_TARGETS": f"loss={CRASH}",
            "CONTRAST_FAULT_RANK": "1",
            "CONTRAST_FAULT_STEP": "13",  # 11 steps per epoch
        },
        timeout=400,
    )
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    said = "restart 1 of 1: rank 1 of 2 failed: RuntimeError: injected fault at step 13"
    assert f"{said}; the 2 processes start again from step 11 (epoch 2)" in proc.stdout
    log = (run / "train.log").read_text()
    assert said in log and "rank 1's traceback:" in log
    assert re.search(r"resuming from \S+: epoch 2/2, step 11", log)
    results = read_results(run)
    assert results["status"] == "completed"
    [restart] = results["restarts"]
    assert restart["failed_rank"] == 1
    assert restart["reason"] == "RuntimeError: injected fault at step 13"
    assert (restart["resumed_from_epoch"], restart["resumed_from_step"]) == (1, 11)


def _until_workers_spawned(pid: int, timeout: float = 120) -> None:
    """Until the launcher has children and takes SIGINT again (/proc: SigIgn without it).
    While it creates them SIGINT is ignored, so that they inherit ignoring it: a Ctrl-C in
    those milliseconds is lost (a known limit, ``launch._our_agent``); the workers then
    still import torch for seconds, which is the start this test is about."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
            status = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            return
        ignored = int(
            next(ln for ln in status.splitlines() if ln.startswith("SigIgn:")).split()[1], 16
        )
        if children and not ignored & (1 << (signal.SIGINT - 1)):
            return
        time.sleep(0.01)
    raise AssertionError("the launcher did not start its workers")


def test_ctrl_c_while_the_workers_start_is_quiet(tmp_path):
    """SIGINT to the launcher as soon as it starts the workers (they are importing torch):
    exit 130, no traceback or warning from torch or multiprocessing, one line."""
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "contrastive_cli", "train", *CFG, f"hydra.run.dir={run}"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    announced = proc.stdout.readline()  # "starting ntxent on digits: ..." before torch loads
    assert announced.startswith("starting ntxent on digits"), announced
    first = proc.stdout.readline()
    assert first.startswith("starting 2 processes"), first
    _until_workers_spawned(proc.pid)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 130, err
    assert err.strip() == "", err
    assert "Traceback" not in out and "death signal" not in out
    assert read_results(run)["status"] == "interrupted"
    assert "contrast resume" in out

"""benchmarks/gpu_check.sh rehearsed on the CPU, so that the one call on a GPU machine does
not fail on a typo: every step runs, the results land in OUT within the device tool's limits
(at most 8 files, plain names), and the summary reads the numbers from the step outputs."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from tests.conftest import REPO

SCRIPT = REPO / "benchmarks" / "gpu_check.sh"


def rehearse(out: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full = {**os.environ, "DEVICE": "cpu", "OUT": str(out), "PYTHON": sys.executable, **env}
    full.pop("CONTRAST_DATA", None)
    return subprocess.run(
        ["bash", str(SCRIPT)], env=full, capture_output=True, text=True, timeout=900
    )


def check_outputs(out: Path, proc: subprocess.CompletedProcess[str], compiled: bool) -> None:
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["check.log", "env.txt", "gpu_check.tgz", "summary.json", "summary.md"]
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files)
    summary = json.loads((out / "summary.json").read_text())
    names = [s["step"] for s in summary["steps"]]
    expected = ["environment", "tests", "throughput_cnn_compile_off"]
    expected += ["throughput_cnn_compile_on"] if compiled else []
    expected += ["throughput_resnet18_compile_off", "train", "reproduce"]
    assert names == expected
    assert all(s["exit"] == 0 for s in summary["steps"])
    rows = {(r["encoder"], r["compile"]): r for r in summary["throughput"]}
    assert set(rows) == {("cnn", False), ("resnet18", False)} | (
        {("cnn", True)} if compiled else set()
    )
    assert rows[("resnet18", False)]["data"] == "cifar10 (3x32x32)"
    assert rows[("cnn", False)]["data"] == "fashion_mnist (1x28x28)"
    assert all(r["images_per_s"] > 0 and r["peak_gpu_mib"] is None for r in rows.values())
    if compiled:
        assert rows[("cnn", True)]["compile_speedup"] > 0
    rep = summary["reproduction"]
    # a deterministic CPU run reproduces bit for bit: the check would say so on the GPU too
    assert rep["compared"] and rep["bit_identical"] and rep["train_status"] == "completed"
    with tarfile.open(out / "gpu_check.tgz") as tar:
        members = tar.getnames()
    assert "runs/train/results.json" in members and "runs/reproduce/results.json" in members
    assert not any(m.endswith((".pt", ".safetensors")) for m in members)
    assert "bit-identical" in (out / "summary.md").read_text()


@pytest.mark.slow  # 2-5 minutes on 2 cores: make test-all (and before any GPU call)
def test_the_gpu_check_runs_end_to_end_on_the_cpu(tmp_path):
    """Every command of the check, at rehearsal sizes; of the CUDA tests one runs (on the
    CPU) and the rest are collected, compile left out (its CPU start-up takes a minute)."""
    out = tmp_path / "out"
    proc = rehearse(out, TESTS_K="killed_mid_epoch", COMPILE_ENCODERS="")
    check_outputs(out, proc, compiled=False)
    log = (out / "check.log").read_text()
    assert "1 passed" in log and "deselected" in log


@pytest.mark.slow
def test_the_whole_gpu_check_rehearsal(tmp_path):
    """The rehearsal exactly as run before a GPU call: all CUDA tests on the CPU, compile on."""
    out = tmp_path / "out"
    check_outputs(out, rehearse(out), compiled=True)


def test_an_unknown_device_is_one_line(tmp_path):
    proc = rehearse(tmp_path / "out", DEVICE="tpu")
    assert proc.returncode == 2
    assert proc.stderr.strip() == "DEVICE=tpu is not allowed; allowed: cuda, cpu"

"""Shared fixtures: compose the real configs, shrink them, run the real CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest
from omegaconf import DictConfig, open_dict

REPO = Path(__file__).resolve().parent.parent

# A run that takes a few seconds on digits: enough steps to exercise every part.
TINY = [
    "trainer.epochs=2",
    "trainer.batch_size=64",
    "eval.probe.max_iter=30",
    "eval.probe.weight_decays=[1e-4,1e-2]",
    "eval.monitor_bank=500",
    "eval.monitor_queries=100",
    "eval.lowshot_draws=2",
    "eval.labelfree_size=256",
    "eval.embedding_points=200",
    "trainer.checkpoint_every_s=0",  # a checkpoint every epoch: what kill/resume tests stop at
]


def run_cli(
    args: Sequence[str],
    cwd: Path,
    env: dict[str, str] | None = None,
    timeout: float = 600,
    check: bool = False,
) -> subprocess.CompletedProcess[str]:
    """``contrast <args>`` in a subprocess, importing this checkout's package."""
    full_env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "PYTHONUNBUFFERED": "1",
        "HYDRA_FULL_ERROR": "0",
        **(env or {}),
    }
    full_env.pop("CONTRAST_DATA", None) if env is None or "CONTRAST_DATA" not in env else None
    proc = subprocess.run(
        [sys.executable, "-m", "contrastive_cli", *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"contrast {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
        )
    return proc


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every regular file under ``folder`` and its bytes (the lock left out): what a refused
    command must leave unchanged."""
    return {
        str(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.is_symlink() and p.name != ".lock"
    }


def one_error_line(capsys, code: int, expected: int | tuple[int, ...] = 2) -> str:
    """The single ``error:`` line an in-process ``cli.main`` call printed, its exit code one
    of ``expected``, no traceback anywhere."""
    out = capsys.readouterr()
    lines = [ln for ln in out.err.splitlines() if ln.strip()]
    expected = expected if isinstance(expected, tuple) else (expected,)
    assert code in expected, (code, out.err, out.out)
    assert len(lines) == 1 and lines[0].startswith("error: "), out.err
    assert "Traceback" not in out.err + out.out
    return lines[0]


def run_dirs(root: Path) -> list[Path]:
    """Run directories (those holding .hydra/config.yaml) under ``root``, oldest first."""
    return sorted((p.parent.parent for p in root.rglob(".hydra/config.yaml")), key=lambda p: str(p))


def read_results(run_dir: Path) -> dict:
    return json.loads((run_dir / "results.json").read_text())


@pytest.fixture
def compose_cfg():
    """compose_cfg(*overrides) -> the config `contrast train` would run (hydra key removed)."""
    from contrastive_cli.config import compose

    def _compose(*overrides: str) -> DictConfig:
        cfg = compose(list(overrides))
        with open_dict(cfg):
            cfg.pop("hydra", None)
        return cfg

    return _compose


@pytest.fixture(autouse=True, scope="session")
def _one_intra_op_thread():
    """Tests run tiny tensors in-process; on a shared 2-core machine a second intra-op thread
    only waits for a busy core (small L-BFGS fits ran 20-100x slower with 2 threads)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True, scope="session")
def _session_baseline_cache(tmp_path_factory):
    """Nothing is read from or written to ~/.cache: ``CONTRAST_CACHE`` (inherited by
    ``run_cli``'s subprocesses) points into the session's temp dir before any fixture of a
    wider scope (a module's reference run) starts."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CONTRAST_CACHE", str(tmp_path_factory.mktemp("contrast-cache")))
        yield


@pytest.fixture(autouse=True)
def _empty_baseline_cache(_session_baseline_cache, tmp_path_factory, monkeypatch):
    """And every test starts with an empty baseline cache of its own."""
    monkeypatch.setenv("CONTRAST_CACHE", str(tmp_path_factory.mktemp("contrast-cache")))


@pytest.fixture
def no_datasets(tmp_path_factory, monkeypatch) -> Path:
    """A machine with no dataset installed: ``CONTRAST_DATA`` (the data root) and
    ``CONTRAST_SYSTEM_DATA`` (Debian's /usr/share/datasets) point at one empty folder, which
    the test may check stays empty. Inherited by spawned processes."""
    empty = tmp_path_factory.mktemp("no-datasets")
    monkeypatch.setenv("CONTRAST_DATA", str(empty))
    monkeypatch.setenv("CONTRAST_SYSTEM_DATA", str(empty))
    return empty

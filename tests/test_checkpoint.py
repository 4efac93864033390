"""Checkpoints under injected faults: failed and interrupted saves, disk full, truncation,
bit rot, malicious pickles; and a real run's checkpoint holds only plain data."""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import pickle
import stat
from pathlib import Path

import pytest
import torch

from contrastive_cli import checkpoint as ckpt
from contrastive_cli.checkpoint import (
    MAGIC,
    latest_valid_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from contrastive_cli.errors import CheckpointError


def _state(value: int) -> dict:
    return {
        "method": {"w": torch.full((64, 64), float(value)), "step": torch.tensor(value)},
        "progress": {"epoch": value, "step_losses": [0.5, 0.25]},
        "config": {"trainer": {"epochs": 3}},
    }


def _saved(directory: Path, *values: int) -> Path:
    path = directory / "checkpoints" / "last.pt"
    for v in values:
        save_checkpoint(path, _state(v))
    return path


def _epoch(path: Path) -> int:
    return load_checkpoint(path)["progress"]["epoch"]


def _stray_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name not in ("last.pt", "prev.pt"))


def _with_trailer(archive: bytes) -> bytes:
    """What an attacker who knows our format would write: a valid end marker and hash."""
    return archive + ckpt._TRAILER.pack(MAGIC, hashlib.sha256(archive).digest(), len(archive))


def test_round_trip_and_previous_kept(tmp_path):
    path = _saved(tmp_path, 1)
    state = load_checkpoint(path)
    assert state["format"] == ckpt.FORMAT and state["progress"] == {
        "epoch": 1,
        "step_losses": [0.5, 0.25],
    }
    assert torch.equal(state["method"]["w"], torch.ones(64, 64))
    save_checkpoint(path, _state(2))
    assert _epoch(path) == 2 and _epoch(path.with_name("prev.pt")) == 1
    assert (
        torch.load(path, weights_only=True)["progress"]["epoch"] == 2
    )  # plain torch.load reads it too
    assert _stray_files(path.parent) == []


def _failing_writer(monkeypatch, after_bytes: int, error: BaseException) -> None:
    """The file write under torch.save fails once ``after_bytes`` are written (disk full)."""
    real_emit = ckpt._HashingWriter._emit

    def emit(self, data: bytes) -> None:
        if self.size + len(data) > after_bytes:
            real_emit(self, data[: max(0, after_bytes - self.size)])
            raise error
        real_emit(self, data)

    monkeypatch.setattr(ckpt._HashingWriter, "_emit", emit)


@pytest.mark.parametrize(
    "error,words",
    [
        (OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), "No space left on device"),
        (OSError(errno.EIO, os.strerror(errno.EIO)), "Input/output error"),
    ],
)
def test_save_failing_halfway_keeps_the_previous_checkpoint(tmp_path, monkeypatch, error, words):
    path = _saved(tmp_path, 1, 2)
    before = path.read_bytes(), path.with_name("prev.pt").read_bytes()
    _failing_writer(monkeypatch, after_bytes=path.stat().st_size // 2, error=error)
    with pytest.raises(CheckpointError) as info:
        save_checkpoint(path, _state(3))
    message = str(info.value)
    assert (
        words in message and str(path) in message and "unchanged" in message and "\n" not in message
    )
    assert (path.read_bytes(), path.with_name("prev.pt").read_bytes()) == before
    assert _epoch(path) == 2 and latest_valid_checkpoint(path.parent) == path
    assert _stray_files(path.parent) == []


def test_interrupt_during_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = _saved(tmp_path, 1)
    _failing_writer(monkeypatch, after_bytes=5_000, error=KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, _state(2))
    assert _epoch(path) == 1 and _stray_files(path.parent) == []


def test_first_save_failing_leaves_nothing(tmp_path, monkeypatch):
    _failing_writer(
        monkeypatch, after_bytes=100, error=OSError(errno.ENOSPC, "No space left on device")
    )
    with pytest.raises(CheckpointError, match="No space left on device"):
        _saved(tmp_path, 1)
    assert _stray_files(tmp_path / "checkpoints") == []
    assert latest_valid_checkpoint(tmp_path / "checkpoints") is None


def test_stale_temp_file_from_a_killed_save_is_removed(tmp_path):
    path = _saved(tmp_path, 1)
    (path.parent / ".last.pt.abc123.tmp").write_bytes(b"half a checkpoint")
    save_checkpoint(path, _state(2))
    assert _stray_files(path.parent) == []


@pytest.mark.parametrize(
    "damage", ["empty", "half", "last_byte_missing", "trailer_only_missing", "bit_flip"]
)
def test_damaged_last_is_refused_and_resume_falls_back_to_prev(tmp_path, caplog, damage):
    path = _saved(tmp_path, 1, 2)
    data = path.read_bytes()
    damaged = {
        "empty": b"",
        "half": data[: len(data) // 2],
        "last_byte_missing": data[:-1],
        "trailer_only_missing": data[: -ckpt._TRAILER.size],
        "bit_flip": data[:1000] + bytes([data[1000] ^ 0x01]) + data[1001:],
    }[damage]
    path.write_bytes(damaged)
    with pytest.raises(CheckpointError, match=r"incomplete|corrupt") as info:
        load_checkpoint(path)
    assert "\n" not in str(info.value) and str(path) in str(info.value)
    with caplog.at_level(logging.WARNING, logger="contrastive_cli.checkpoint"):
        assert latest_valid_checkpoint(path.parent) == path.with_name("prev.pt")
    assert str(path) in caplog.text
    assert _epoch(latest_valid_checkpoint(path.parent)) == 1


def test_a_crash_between_the_two_renames_still_resumes(tmp_path):
    path = _saved(tmp_path, 1, 2)
    path.unlink()  # last.pt moved to prev.pt, new one not yet in place
    assert latest_valid_checkpoint(path.parent) == path.with_name("prev.pt")


def test_no_usable_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    path = _saved(tmp_path, 1, 2)
    for p in (path, path.with_name("prev.pt")):
        p.write_bytes(p.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="no usable checkpoint") as info:
        latest_valid_checkpoint(path.parent)
    assert "last.pt" in str(info.value) and "prev.pt" in str(info.value)
    assert latest_valid_checkpoint(tmp_path / "empty") is None


class _Payload:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _malicious(kind: str, marker: Path, where: Path) -> bytes:
    if kind == "torch_zip":  # torch.save of an object whose unpickling runs code
        torch.save({"format": ckpt.FORMAT, "method": _Payload(marker)}, where)
        return where.read_bytes()
    if kind == "torch_zip_with_trailer":
        torch.save({"format": ckpt.FORMAT, "method": _Payload(marker)}, where)
        return _with_trailer(where.read_bytes())
    return _with_trailer(pickle.dumps(_Payload(marker), protocol=2))  # legacy, not a zip


@pytest.mark.parametrize(
    "kind", ["torch_zip", "torch_zip_with_trailer", "plain_pickle_with_trailer"]
)
def test_malicious_pickle_is_refused_and_does_not_run(tmp_path, kind):
    marker = tmp_path / "pwned"
    path = _saved(tmp_path, 1)
    path.write_bytes(_malicious(kind, marker, tmp_path / "evil.pt"))
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "\n" not in message and str(path) in message
    assert "refused" in message or "not loaded" in message, message
    assert not marker.exists(), "the pickled payload ran"
    # sanity: the same file does run its payload under an unsafe load
    if kind == "torch_zip":
        torch.load(tmp_path / "evil.pt", weights_only=False)
        assert marker.exists()


def test_unsafe_state_is_caught_when_saving_not_when_resuming(tmp_path):
    from omegaconf import OmegaConf

    with pytest.raises(TypeError, match="DictConfig"):
        save_checkpoint(tmp_path / "last.pt", {"config": OmegaConf.create({"a": 1})})
    assert not (tmp_path / "last.pt").exists()


def test_every_torch_load_in_the_package_is_weights_only():
    package = Path(__file__).resolve().parent.parent / "contrastive_cli"
    for source in package.rglob("*.py"):
        for number, line in enumerate(source.read_text().splitlines(), 1):
            if "torch.load(" in line and not line.lstrip().startswith(("#", "``", "A ")):
                assert "weights_only=True" in line, f"{source}:{number}: {line.strip()}"


def test_a_real_run_checkpoints_plain_data_and_resumes_from_prev(tmp_path, compose_cfg, caplog):
    """Two epochs on digits; then last.pt is damaged and the run resumes from prev.pt."""
    from contrastive_cli.run import run_training

    overrides = [
        "trainer.epochs=2",
        "trainer.batch_size=512",
        "eval.every=0",
        "eval.baselines=false",
        "eval.probe.max_iter=5",
        "eval.probe.weight_decays=[1e-3]",
        "eval.knn_k=[20]",
        "device=cpu",
        "trainer.checkpoint_every_s=0",
    ]
    run_training(compose_cfg(*overrides), tmp_path)
    last, prev = tmp_path / "checkpoints" / "last.pt", tmp_path / "checkpoints" / "prev.pt"
    for path, epoch in ((last, 2), (prev, 1)):
        state = load_checkpoint(path)  # weights_only=True: plain data by construction
        assert state["progress"]["epoch"] == epoch
        assert type(state["config"]) is dict and state["config"]["trainer"]["epochs"] == 2
        ckpt._check_plain(state, "state")
    last.write_bytes(last.read_bytes()[:-10])
    with caplog.at_level(logging.INFO):
        results = run_training(compose_cfg(*overrides, "trainer.resume=true"), tmp_path)
    assert results["status"] == "completed"
    assert f"checkpoint {last}" in caplog.text and f"resuming from {prev}" in caplog.text
    assert _epoch(last) == 2


def test_malicious_last_pt_is_refused_by_contrast_train_resume(tmp_path):
    """The real command, resuming a run whose last.pt was replaced (with a forged checksum)."""
    from tests.conftest import run_cli

    run_dir, marker = tmp_path / "run", tmp_path / "pwned"
    (run_dir / "checkpoints").mkdir(parents=True)
    last = run_dir / "checkpoints" / "last.pt"
    last.write_bytes(_malicious("torch_zip_with_trailer", marker, tmp_path / "evil.pt"))
    proc = run_cli(
        ["train", "trainer.resume=true", f"hydra.run.dir={run_dir}", "trainer.epochs=1"],
        cwd=tmp_path,
        timeout=300,
    )
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: checkpoint {last} was refused") and ".system" in lines[0]
    assert not marker.exists() and "Traceback" not in proc.stderr


def test_checkpoints_are_written_0644_like_every_other_output(tmp_path):
    """mkstemp creates 0600 files; a checkpoint is shared like results.json and plots."""
    path = tmp_path / "checkpoints" / "last.pt"
    ckpt.save_checkpoint(path, {"epoch": 1})
    ckpt.save_checkpoint(path, {"epoch": 2})
    assert {stat.S_IMODE(p.stat().st_mode) for p in path.parent.iterdir()} == {0o644}


@pytest.mark.parametrize("every,saves", [(3600, 1), (0, 3)])
def test_checkpoints_follow_a_cadence_and_the_end_always_gets_one(
    tmp_path, compose_cfg, monkeypatch, every, saves
):
    """trainer.checkpoint_every_s bounds the bytes written: with a long cadence three epochs
    write one checkpoint (the last epoch's), with 0 one per epoch."""
    from contrastive_cli import run
    from contrastive_cli.callbacks import checkpointing

    written = []
    real = checkpointing.save_checkpoint
    monkeypatch.setattr(
        checkpointing, "save_checkpoint", lambda p, s: (written.append(1), real(p, s))
    )
    cfg = compose_cfg(
        "trainer.epochs=3",
        "trainer.batch_size=512",
        f"trainer.checkpoint_every_s={every}",
        "eval.every=0",
        "eval.baselines=false",
        "eval.plots=false",
        "eval.probe.max_iter=5",
        "eval.probe.weight_decays=[1e-3]",
        "eval.knn_k=[20]",
        "device=cpu",
    )
    run.run_training(cfg, tmp_path)
    assert (
        len(written) == saves
        and load_checkpoint(tmp_path / "checkpoints" / "last.pt")["progress"]["epoch"] == 3
    )

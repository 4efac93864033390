"""Checkpoints that survive crashes, detect damage and never run pickled code.

File layout: the ``torch.save`` archive, then a 56-byte trailer: ``MAGIC``, the SHA-256 of
the archive and its length. The trailer is written last, so a file cut short at any point
lacks it, and the hash catches bytes changed afterwards. One file rather than a checksum
sidecar: a single rename publishes archive and checksum together, and plain ``torch.load``
still reads the file (it ignores bytes after the zip archive).

Saving writes ``.<name>.<random>.tmp`` in the same folder, flushes and fsyncs it, moves the
current ``last.pt`` to ``prev.pt``, renames the temp file to ``last.pt`` and fsyncs the
folder. At every instant one complete checkpoint exists under one of the two names, so
``latest_valid_checkpoint`` can fall back to ``prev.pt`` when ``last.pt`` is missing or damaged.

Loading checks the trailer and hash before unpickling anything, then unpickles with
``torch.load(weights_only=True)``: a checkpoint is one dict of tensors and plain Python types
(never config objects), and anything else, such as a pickle that would run code, is refused.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import logging
import os
import pickle
import struct
import tempfile
from pathlib import Path
from typing import Any, BinaryIO

import torch

from contrastive_cli.errors import CheckpointError

log = logging.getLogger(__name__)

FORMAT = "contrast-checkpoint-v1"
MAGIC = b"contrast-ckpt-v1"  # 16 bytes
_TRAILER = struct.Struct("<16s32sQ")  # magic, sha256(archive), len(archive)
PLAIN = (
    str,
    int,
    float,
    bool,
    bytes,
    type(None),
    torch.Tensor,
    torch.Size,
    torch.dtype,
    torch.device,
)


def previous_path(path: Path) -> Path:
    """Where the checkpoint before ``path`` is kept: ``last.pt`` -> ``prev.pt``."""
    stem = "prev" if path.stem == "last" else f"{path.stem}.prev"
    return path.with_name(stem + path.suffix)


class _HashingWriter:
    """A write-only stream that hashes and counts what passes through it to ``file``.

    torch.save's C++ writer turns an exception raised here into a RuntimeError without the
    cause ("unexpected pos ..."), so the original one is kept in ``error`` to re-raise.
    """

    def __init__(self, file: BinaryIO):
        self.file = file
        self.sha256 = hashlib.sha256()
        self.size = 0
        self.error: BaseException | None = None

    def write(self, data: bytes) -> int:
        try:
            self._emit(data)
        except BaseException as e:
            self.error = e
            raise
        self.sha256.update(data)
        self.size += len(data)
        return len(data)

    def _emit(self, data: bytes) -> None:
        self.file.write(data)

    def flush(self) -> None:
        self.file.flush()

    def fileno(self) -> int:
        return self.file.fileno()


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically; the checkpoint it replaces becomes ``prev.pt``.

    A failure (disk full, I/O error, an interrupt) leaves the existing checkpoints as they
    were and no temp file behind; an OSError becomes one CheckpointError line.
    """
    _check_plain(state, "state")
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        tmp = Path(name)
        with os.fdopen(fd, "wb") as f:
            writer = _HashingWriter(f)
            try:
                torch.save({"format": FORMAT, **state}, writer)
            except BaseException as e:
                if writer.error is None or e is writer.error:
                    raise
                raise writer.error from None
            writer.write(_TRAILER.pack(MAGIC, writer.sha256.digest(), writer.size))
            f.flush()
            os.fsync(f.fileno())
        if path.exists():
            os.replace(path, previous_path(path))
        os.replace(tmp, path)
        tmp = None
        _fsync_dir(path.parent)
    except OSError as e:
        reason = os.strerror(e.errno) if e.errno else str(e)
        raise CheckpointError(
            f"cannot write checkpoint {path} ({reason}); the checkpoints already there are unchanged"
        ) from None
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)
    _remove_stale_temp_files(path)


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The state saved in ``path``, after checking that the file is complete and unchanged.

    Refuses (CheckpointError, one line) a missing, truncated, corrupted or foreign file, and
    any file holding objects other than tensors and plain data; nothing in it is run.
    """
    archive = _verified_archive(path)
    try:
        state = torch.load(io.BytesIO(archive), map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"checkpoint {path} was refused: it holds objects other than tensors and plain data "
            f"({_refusal_reason(e)}); only load checkpoints from sources you trust"
        ) from None
    except Exception as e:  # a damaged archive that still matches its hash: not written by us
        raise CheckpointError(f"checkpoint {path} cannot be read ({_first_line(e)})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is not a contrast checkpoint ({FORMAT})")
    return state


def verify_checkpoint(path: Path) -> None:
    """Raise CheckpointError unless ``path`` is complete and matches its checksum."""
    _verified_archive(path)


def latest_valid_checkpoint(directory: Path, name: str = "last.pt") -> Path | None:
    """The newest complete checkpoint in ``directory``: ``last.pt``, else ``prev.pt``.

    Logs a warning naming each damaged file it skips. Returns None when there is no
    checkpoint at all, and raises CheckpointError when there are some but none is usable,
    so that a resume never silently starts over.
    """
    candidates = [
        p for p in (directory / name, previous_path(directory / name)) if os.path.lexists(p)
    ]
    problems = []
    for path in candidates:
        try:
            verify_checkpoint(path)
        except CheckpointError as e:
            problems.append(str(e))
            log.warning(
                f"warning: {e}; "
                + ("trying an older one" if path != candidates[-1] else "no older one")
            )
            continue
        return path
    if problems:
        raise CheckpointError(f"no usable checkpoint in {directory}: {'; '.join(problems)}")
    return None


def _verified_archive(path: Path) -> bytes:
    from contrastive_cli.untrusted import Missing, UntrustedFile, read_bytes

    try:  # a regular file only: never through a link, never a FIFO or device
        data = read_bytes(path, "weights", root=path.parent)
    except Missing:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except UntrustedFile as e:
        raise CheckpointError(f"checkpoint {e}") from None
    if len(data) < _TRAILER.size:
        raise CheckpointError(
            f"checkpoint {path} is incomplete ({len(data)} bytes; truncated or not written by contrast)"
        )
    magic, digest, size = _TRAILER.unpack(data[-_TRAILER.size :])
    if magic != MAGIC:
        raise CheckpointError(
            f"checkpoint {path} is incomplete or not a contrast checkpoint (no end marker); it was not loaded"
        )
    archive = data[: -_TRAILER.size]
    if size != len(archive) or hashlib.sha256(archive).digest() != digest:
        raise CheckpointError(
            f"checkpoint {path} is corrupt (checksum mismatch); it was not loaded"
        )
    return archive


def _check_plain(value: object, where: str) -> None:
    """Fail at save time, not at resume, if the state holds something weights_only refuses."""
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, (str, int)):
                raise TypeError(
                    f"checkpoint {where} has a key of type {type(k).__name__}: only str and int keys"
                )
            _check_plain(v, f"{where}[{k!r}]")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_plain(v, f"{where}[{i}]")
    elif not isinstance(value, PLAIN):
        raise TypeError(
            f"checkpoint {where} is a {type(value).__module__}.{type(value).__name__}: "
            "keep checkpoints to tensors and plain types (e.g. OmegaConf.to_container for configs)"
        )


def _remove_stale_temp_files(path: Path) -> None:
    """Temp files left by a save that was killed (kill -9, power loss) are garbage."""
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        with contextlib.suppress(OSError):
            stale.unlink()


def _refusal_reason(e: BaseException) -> str:
    """The line of torch's long weights_only message that says what was refused."""
    boilerplate = (
        "Weights only load failed",
        "Check the documentation",
        "(1)",
        "(2)",
        "Please file",
    )
    for line in str(e).splitlines():
        line = line.strip().removeprefix("WeightsUnpickler error:").strip()
        if line and not line.startswith(boilerplate):
            return line[:200]
    return _first_line(e)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:200]


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # not possible on every platform (Windows)
        return
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.EBADF):  # some filesystems cannot fsync folders
            raise
    finally:
        os.close(fd)

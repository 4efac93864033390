"""The one owner of a run directory's files while a command writes into it.

A run directory may come from someone else, so nothing in it is trusted when writing:

- no file or folder inside it is written through a symbolic link (a ``train.log`` linked to
  ``~/.bashrc`` would otherwise be appended to); whole files are written to a temp file and
  renamed over the name, which replaces a link instead of following it, and appended files
  are opened with ``O_NOFOLLOW``;
- one command at a time: ``lock()`` takes an OS lock on ``<run>/.lock`` (``flock``, which
  the kernel releases when the process dies, also after kill -9), so a second ``resume`` of
  the same run stops with one line instead of interleaving its checkpoints with the first.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from contrastive_cli.errors import Refused, UserError

LOCK = ".lock"
FILE_MODE = 0o644  # like every other output: readable by the group and others


class UnsafePath(UserError):
    """A run-directory path that would write through a symbolic link."""

    exit_code = 2


def safe_path(run_dir: Path, relative: str | Path, create: bool = True) -> Path:
    """``run_dir / relative`` after checking that neither it nor a folder between it and
    ``run_dir`` is a symbolic link (folders are created as needed, when ``create``)."""
    path = Path(run_dir) / relative
    parts = Path(relative).parts
    current = Path(run_dir)
    for i, part in enumerate(parts):
        current = current / part
        if current.is_symlink():
            raise UnsafePath(
                f"{current} is a symbolic link; contrast does not write through links in a run "
                f"directory (remove it, or copy the run to a new folder)"
            )
        if create and i < len(parts) - 1 and not current.exists():
            current.mkdir()
    return path


def check_file(path: Path) -> Path:
    """``path`` unless something other than a regular file sits there: a FIFO would block
    the first write, a folder or device fail it midway; refused before the run starts."""
    import stat

    try:
        mode = os.lstat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):  # not there yet (or its folder is not)
        return path
    if stat.S_ISLNK(mode):
        raise UnsafePath(
            f"{path} is a symbolic link; contrast does not write through links in a run "
            "directory (remove it, or copy the run to a new folder)"
        )
    if not stat.S_ISREG(mode):
        what = "a folder" if stat.S_ISDIR(mode) else "a FIFO or device"
        raise UnsafePath(
            f"{path} is {what}; allowed: a regular file (remove it, or copy the run to a new "
            "folder)"
        )
    return path


def write_text_atomic(path: Path, text: str, mode: int = FILE_MODE) -> None:
    """Write ``text`` to a temp file beside ``path``, then rename it over ``path``: readers
    never see half a file, a link at ``path`` is replaced rather than followed, and a failed
    write leaves no temp file behind."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fchmod(f.fileno(), mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def write_json(path: Path, data: Any) -> None:
    """JSON, atomically (see ``write_text_atomic``)."""
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def open_append(path: Path) -> int:
    """A file descriptor appending to ``path``, refusing a symbolic link, and anything but a
    regular file (a FIFO would block the open until someone reads it; a folder, a device)."""
    import stat

    flags = (
        os.O_WRONLY
        | os.O_APPEND
        | os.O_CREAT
        | getattr(os, "O_NOFOLLOW", 0)
        | getattr(os, "O_NONBLOCK", 0)
        | getattr(os, "O_CLOEXEC", 0)
    )
    try:
        fd = os.open(path, flags, FILE_MODE)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UnsafePath(
                f"{path} is a symbolic link; contrast does not write through links in a run "
                "directory (remove it, or copy the run to a new folder)"
            ) from None
        if e.errno in (errno.EISDIR, errno.ENXIO):  # a folder; a FIFO nobody reads, a socket
            raise UnsafePath(
                f"{path} is a {'folder' if e.errno == errno.EISDIR else 'FIFO or socket'}; "
                "allowed: a regular file (remove it, or copy the run to a new folder)"
            ) from None
        raise
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise UnsafePath(
            f"{path} is not a regular file (a FIFO or device); allowed: a regular file "
            "(remove it, or copy the run to a new folder)"
        )
    os.set_blocking(fd, True)
    return fd


class SafeFileHandler(logging.FileHandler):
    """A logging FileHandler that will not follow a symbolic link (train.log)."""

    def _open(self):  # type: ignore[override]
        return os.fdopen(  # a non-UTF-8 file name in a message is written as \xNN
            open_append(Path(self.baseFilename)), "a", encoding="utf-8", errors="backslashreplace"
        )


@contextlib.contextmanager
def logging_to(path: Path, level: int | None = None) -> Iterator[None]:
    """The package's log lines also appended to ``path`` (train.log), timestamped, while the
    block runs; ``level`` sets the package logger's level too."""
    handler = SafeFileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%Y-%m-%d %H:%M:%S"))
    logger = logging.getLogger("contrastive_cli")
    if level is not None:
        logger.setLevel(level)
    logger.addHandler(handler)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        handler.close()


@contextlib.contextmanager
def lock(run_dir: Path, command: str) -> Iterator[None]:
    """Hold the run directory's lock for the duration; UserError (one line) if another
    process holds it. The kernel releases the lock when its holder dies (even kill -9); the
    file a killed holder left is taken over with a message, and removed on the way out.
    Without ``fcntl`` (Windows) there is no lock."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on POSIX
        yield
        return
    path = safe_path(run_dir, LOCK)
    while True:
        fd = open_append(path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            holder = _read_holder(path)
            raise Refused(
                f"{run_dir} is in use by another contrast command{holder}; wait for it to finish "
                "(two commands writing one run directory would mix their checkpoints)",
                exit_code=1,
            ) from None
        # The holder before us may have removed the file after we opened it: then this lock
        # guards nothing, and the new file is the one to lock.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path, follow_symlinks=False))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        if stale := _read_holder(path):
            logging.getLogger(__name__).info(
                f"{run_dir}: taking over the lock left by a command that no longer runs{stale}"
            )
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {command}\n".encode())
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)  # while still held: nobody else can have locked this file
        os.close(fd)  # releases the lock


def _read_holder(path: Path) -> str:
    """Who holds the lock, from the file's "<pid> <command>" (read as untrusted: bounded,
    no link, no FIFO; shown without control characters)."""
    from contrastive_cli.untrusted import UntrustedFile, printable, read_bytes

    try:
        text = read_bytes(path, "lock", path.parent).decode(errors="replace")
    except UntrustedFile:
        return ""
    pid, _, command = text.strip().partition(" ")
    return f" (`contrast {printable(command)[:40]}`, pid {pid})" if pid.isdigit() else ""

"""What a group of worker processes (``trainer.devices=N``) tells the user when one fails
or the group restarts.

Each worker that fails leaves a report (``report``) in a folder the launcher shares with
them: its rank, the restart attempt, and what happened, of one of three kinds: ``error``
(a user error, one line), ``crash`` (an unexpected exception: type, message, traceback) or
``lost`` (a collective failed because another process went away). ``lost`` is a
consequence, never the cause: when one rank crashes, the others lose contact with it a
moment later, and torch's launcher then stops them with SIGTERM. So the cause is the first
``error`` or ``crash`` of the last attempt, else a rank killed by a signal (it could leave
no report), else the first ``lost``.

The launcher writes what happened where a single process would have: the cause's last
line on the console, its traceback and the other ranks' consequences in ``train.log``,
``results.json`` with status ``failed``, the failing rank and the error (rank 0 may have
recorded "interrupted" when the launcher stopped it: that is not what happened). Each
elastic restart (``trainer.max_restarts``) is logged and kept in ``results.json``'s
``restarts``: the failed rank, the reason, and the step the group resumed from.
"""

from __future__ import annotations

import contextlib
import json
import logging
import signal
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from contrastive_cli import writer
from contrastive_cli.errors import UserError
from contrastive_cli.signals import Interrupted

log = logging.getLogger(__name__)
STOPPED = {128 + signal.SIGINT, 128 + signal.SIGTERM}  # exit codes of a stopped worker


def report(
    folder: str | Path,
    attempt: int,
    rank: int,
    kind: str,
    message: str,
    code: int,
    error: BaseException | None = None,
) -> None:
    """Leave this worker's failure for the launcher (best effort: a full disk must not
    hide the error itself)."""
    record = {
        "attempt": attempt,
        "rank": rank,
        "kind": kind,
        "message": message,
        "exit_code": code,
        "time": time.time(),
        "traceback": "".join(traceback.format_exception(error)) if error is not None else None,
    }
    with contextlib.suppress(OSError):
        (Path(folder) / f"attempt{attempt}-rank{rank}.json").write_text(json.dumps(record))


def reports(folder: Path, attempt: int) -> dict[int, dict[str, Any]]:
    """{rank: report} that the workers of ``attempt`` left."""
    found = {}
    for path in folder.glob(f"attempt{attempt}-rank*.json"):
        with contextlib.suppress(OSError, ValueError, KeyError):
            record = json.loads(path.read_text())
            found[int(record["rank"])] = record
    return found


@dataclass
class Failure:
    """The failure of a worker group, as the user is told it."""

    rank: int | None  # None: the group was stopped by a signal, no rank failed
    reason: str  # what happened to ``rank``, in one line
    exit_code: int
    traceback: str | None = None
    consequences: tuple[str, ...] = ()  # what the other ranks reported

    @property
    def interrupted(self) -> bool:
        return self.rank is None


def first_failure(exit_codes: dict[int, int], folder: Path, attempt: int, n: int) -> Failure:
    """The cause among the ranks of ``attempt`` that exited with ``exit_codes`` (module
    docstring); a group that only stopped on SIGINT/SIGTERM is an interruption."""
    found = reports(folder, attempt)
    causes = [r for r in found.values() if r.get("kind") in ("error", "crash")]
    stops = {int(signal.SIGINT), int(signal.SIGTERM)}
    stopped = {abs(c) if c < 0 else c - 128 for c in exit_codes.values()}  # signal numbers
    # Killed, and said nothing: a signal torch's launcher sends the others comes last.
    killed = sorted(
        (r for r, code in exit_codes.items() if code < 0 and r not in found),
        key=lambda r: (-exit_codes[r] in stops, r),
    )
    if causes:
        first = min(causes, key=lambda r: (r["time"], r["rank"]))
        rank, reason, code = first["rank"], first["message"], int(first["exit_code"])
    elif exit_codes and stopped <= stops:
        return Failure(None, "stopped", 128 + max(stopped))
    elif killed:
        rank, reason, code = killed[0], _signalled(exit_codes[killed[0]]), 1
    elif found:
        first = min(found.values(), key=lambda r: (r["time"], r["rank"]))
        rank, reason, code = first["rank"], first["message"], int(first["exit_code"])
    else:
        rank = min(exit_codes) if exit_codes else 0
        reason, code = _signalled(exit_codes.get(rank, 1)), 1
    detail = found.get(rank, {}).get("traceback")
    others = tuple(
        f"rank {r} of {n} " + (found[r]["message"] if r in found else _signalled(exit_codes[r]))
        for r in sorted(set(exit_codes) | set(found))
        if r != rank
    )
    return Failure(rank, reason, code, detail, others)


def describe(failure: Failure, n: int) -> str:
    """'rank 1 of 2 was killed by SIGKILL', 'rank 1 of 2 failed: RuntimeError: ...'."""
    if failure.reason.startswith(("was ", "exited ")):
        return f"rank {failure.rank} of {n} {failure.reason}"
    return f"rank {failure.rank} of {n} failed: {failure.reason}"


def _signalled(code: int) -> str:
    if code < 0 and -code in signal.Signals._value2member_map_:
        return f"was killed by {signal.Signals(-code).name}"
    if code in STOPPED:
        return f"was stopped by {signal.Signals(code - 128).name}"
    return f"exited with code {code}"


def as_error(failure: Failure, n: int, run_dir: Path) -> BaseException:
    """The exception the launcher raises: one line naming the failing rank."""
    resume = f"continue with: contrast resume {run_dir}"
    if failure.interrupted:
        return Interrupted(failure.exit_code - 128, f"stopped; {resume}")
    if failure.traceback is not None:  # a crash: the type and message, traceback in train.log
        line = (
            f"rank {failure.rank} of {n} failed: {failure.reason} (traceback in "
            f"{run_dir / 'train.log'}); the other processes were stopped; {resume}"
        )
    elif failure.reason.startswith(("was ", "exited ")):
        line = f"{describe(failure, n)}; the other processes were stopped; {resume}"
    else:
        line = f"{failure.reason} (rank {failure.rank} of {n})"
    error = WorkerFailed(line)
    error.exit_code = failure.exit_code
    error.failure = failure
    return error


class WorkerFailed(UserError):
    """A worker process failed; the message names its rank."""

    failure: Failure | None = None


def record_failure(
    run_dir: Path, failure: Failure, n: int, message: str, restarts: list[dict]
) -> None:
    """train.log: the cause, its traceback, the other ranks' consequences; results.json:
    status failed with the failing rank and the error, keeping what rank 0 recorded of the
    run's progress (best effort: the error itself must reach the user)."""
    from contrastive_cli.rundirs import read_results

    lines = [f"error: {message}"]
    if failure.traceback:
        lines.append(f"rank {failure.rank}'s traceback:\n{failure.traceback.rstrip()}")
    lines += [f"as a consequence, {c}" for c in failure.consequences]
    append_to_train_log(run_dir, "\n".join(lines))
    with contextlib.suppress(OSError, UserError):
        previous, _ = read_results(run_dir / "results.json")
        results = {
            **(previous or {"run_dir": str(run_dir)}),
            "status": "failed",
            "error": describe(failure, n),
            "failed_rank": failure.rank,
        }
        if restarts:
            results["restarts"] = restarts
        writer.write_json(writer.safe_path(run_dir, "results.json"), results)


def record_interrupted(run_dir: Path, message: str) -> bool:
    """results.json for a group stopped before rank 0 could write one (while starting);
    whether it was needed."""
    if (run_dir / "results.json").exists():
        return False
    with contextlib.suppress(OSError, UserError):
        results = {"status": "interrupted", "run_dir": str(run_dir), "error": message}
        writer.write_json(writer.safe_path(run_dir, "results.json"), results)
    return True


def append_to_train_log(run_dir: Path, text: str) -> None:
    """Append ``text`` to train.log as the run's own lines are (not to the console)."""
    stamp = time.strftime("%Y-%m-%d %H:%M:%S")
    with contextlib.suppress(OSError, UserError):
        fd = writer.open_append(writer.safe_path(run_dir, "train.log"))
        with open(fd, "a") as f:
            f.write(f"{stamp} {text}\n")


RESTARTS_FILE = "restarts.json"
_restarts: list[dict[str, Any]] = []  # this worker's group's restarts so far


def load_restarts(folder: str | Path) -> None:
    """In a worker: the restarts the launcher recorded before starting it."""
    with contextlib.suppress(OSError, ValueError):
        _restarts[:] = json.loads((Path(folder) / RESTARTS_FILE).read_text())


def restarts_so_far() -> dict[str, Any]:
    """``{"restarts": [...]}`` for results.json (and the trackers, which log it) in a group
    that torch elastic restarted; empty otherwise."""
    return {"restarts": list(_restarts)} if _restarts else {}


class Restarts:
    """The group's elastic restarts as torch's agent makes them (see ``launch._our_agent``):
    each is logged (console and train.log) when the new processes start, and left for
    them (``load_restarts``) to put in results.json and the trackers: the failed rank,
    the reason and the step resumed from."""

    def __init__(self, run_dir: Path, folder: Path, n: int, allowed: int):
        self.run_dir, self.folder, self.n, self.allowed = run_dir, folder, n, allowed
        self.records: list[dict[str, Any]] = []
        self._pending: Failure | None = None

    @property
    def attempt(self) -> int:
        return len(self.records)

    def failed(self, exit_codes: dict[int, int]) -> None:
        """The agent saw the group fail; it restarts it if restarts are left."""
        if self._pending is None and self.attempt < self.allowed:
            self._pending = first_failure(exit_codes, self.folder, self.attempt, self.n)

    def starting(self) -> None:
        """The agent is about to start the processes: after a failure, a restart."""
        failure, self._pending = self._pending, None
        if failure is None:
            return
        epoch, step = checkpoint_position(self.run_dir)
        self.records.append(
            {
                "restart": self.attempt + 1,
                "failed_rank": failure.rank,
                "reason": failure.reason,
                "resumed_from_epoch": epoch,
                "resumed_from_step": step,
                "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            }
        )
        with contextlib.suppress(OSError):  # what the new processes put in results.json
            (self.folder / RESTARTS_FILE).write_text(json.dumps(self.records))
        if failure.traceback:
            append_to_train_log(
                self.run_dir, f"rank {failure.rank}'s traceback:\n{failure.traceback.rstrip()}"
            )
        log.warning(
            f"restart {self.attempt} of {self.allowed}: {describe(failure, self.n)}; the "
            f"{self.n} processes start again from "
            + (f"step {step} (epoch {epoch + 1})" if step else "the beginning (no checkpoint yet)")
        )


def checkpoint_position(run_dir: Path) -> tuple[int, int]:
    """(epoch, step) of the checkpoint a resumed run starts from; (0, 0) without one."""
    from contrastive_cli.checkpoint import latest_valid_checkpoint, load_checkpoint
    from contrastive_cli.runfiles import CHECKPOINT

    with contextlib.suppress(Exception):  # what to say about it, not whether to resume
        path = latest_valid_checkpoint(run_dir / CHECKPOINT.parent)
        if path is not None:
            progress = load_checkpoint(path)["progress"]
            return int(progress["epoch"]), int(progress["step"])
    return 0, 0

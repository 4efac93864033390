"""Experiment tracking: copy a run's parameters, metrics and files to MLflow and TensorBoard.

The run directory stays the record; trackers put the same facts where people compare runs.
``tracker=[mlflow,tensorboard]`` (config group ``conf/tracker/``) selects them; each option
builds one tracker object (``_target_``) with the five calls of ``Tracker``.

Tracking never blocks or breaks training. ``Trackers`` connects each tracker before training
starts (bounded by its timeout), then hands every call to one background thread, in order,
so a slow database or server costs the training loop nothing; a tracker that raises is
reported in one warning line and switched off for the rest of the run (the others go on). Only process rank 0 tracks. Nothing here imports mlflow or tensorboard: a run
without trackers pays nothing for them.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import queue
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from omegaconf import DictConfig

from contrastive_cli import install_hint
from contrastive_cli.errors import ConfigError

log = logging.getLogger(__name__)
STATE_FILE = "tracking.json"  # in a run directory: where the run is tracked (MLflow run id, ...)
FINISH_TIMEOUT_S = 300.0  # longest wait, at the end of a run, for trackers to finish uploading
METHODS = ("start", "log_step", "log_epoch", "log_embedding", "finish")  # of every Tracker


@dataclass
class EmbeddingSample:
    """The fixed test subset of the embedding map, with what the encoder made of it."""

    features: Any  # (N, D) float tensor on the CPU: encoder output, eval protocol
    labels: Any  # (N,) int64 tensor
    images: Any  # (N, C, H, W) uint8 tensor: thumbnails
    class_names: list[str] | None = None


class Tracker(Protocol):
    """One place a run is logged to. Calls come from one thread, in this order: start, any
    number of log_step/log_epoch, at most one log_embedding, finish. Each may raise: the
    caller reports it once and stops calling that tracker."""

    name: str  # the option in conf/tracker/, for messages

    def start(
        self, run_dir: Path, config: dict[str, Any], choices: dict[str, str], resumed: bool
    ) -> None: ...

    def log_step(self, step: int, values: dict[str, float]) -> None: ...

    def log_epoch(self, record: dict[str, Any]) -> None: ...

    def log_embedding(self, sample: EmbeddingSample, step: int) -> None: ...

    def finish(self, status: str, results: dict[str, Any], run_dir: Path) -> None: ...

    # Optional: ``close()`` releases local resources (open files) after the tracker failed.


class TrackingUnavailable(Exception):
    """The tracker cannot work for this run (server unreachable...): a one-line reason."""


def require(module: str, tracker: str) -> None:
    """ConfigError naming the extra to install when ``module`` is not importable (checked
    without importing it, so validation stays fast)."""
    try:
        found = importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        found = False
    if not found:
        raise ConfigError(
            f"tracker={tracker} needs the {module} package, which is not installed; "
            f"install it with: {install_hint('tracking')}"
        )


def read_state(directory: Path) -> dict[str, Any]:
    """``tracking.json`` of a run (or sweep) directory; {} when absent or unreadable."""
    from contrastive_cli.untrusted import UntrustedFile, read_json

    try:  # a regular file of at most 1 MiB, never through a link, never a FIFO
        state = read_json(directory / STATE_FILE, "json", root=directory)
    except UntrustedFile:
        return {}
    return state if isinstance(state, dict) else {}


def update_state(directory: Path, tracker: str, entry: dict[str, Any]) -> None:
    """Record ``entry`` under ``tracker`` in the directory's ``tracking.json`` (atomically)."""
    from contrastive_cli.report import write_json

    state = read_state(directory)
    state[tracker] = entry
    write_json(directory / STATE_FILE, state)


def is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def results_markdown(results: dict[str, Any]) -> str | None:
    """The end-of-run numbers as a Markdown table, one row per metric: the trained encoder,
    then each baseline (raw pixels, random init). None when the run has no metrics."""
    metrics = {k: v for k, v in (results.get("metrics") or {}).items() if is_number(v)}
    if not metrics:
        return None
    baselines = {name: values or {} for name, values in (results.get("baselines") or {}).items()}
    names = ["trained", *(name.replace("_", " ") for name in baselines)]
    rows = [f"| metric | {' | '.join(names)} |", "|---" * (len(names) + 1) + "|"]
    for key, value in metrics.items():
        cells = [_cell(value), *(_cell(b.get(key)) for b in baselines.values())]
        rows.append(f"| {key} | {' | '.join(cells)} |")
    return "\n".join(rows)


def _cell(value: object) -> str:
    return f"{value:.4g}" if is_number(value) else ""


def restart_line(restart: dict[str, Any]) -> str:
    """One restart of a group of processes, as results.json records it, in words."""
    return (
        f"rank {restart.get('failed_rank')}: {restart.get('reason')}; resumed from step "
        f"{restart.get('resumed_from_step')}"
    )


def one_line(e: BaseException) -> str:
    text = str(e).strip()
    line = text.splitlines()[0] if text else ""
    return f"{type(e).__name__}: {line[:300]}" if not isinstance(e, TrackingUnavailable) else line


class Trackers:
    """Fan-out to the chosen trackers: ``start`` in the caller's thread, every later call on
    one background thread (started on first use), in order."""

    def __init__(self, trackers: Sequence[Tracker] = ()):
        self.trackers = list(trackers)
        self.run_dir: Path | None = None
        self._queue: queue.Queue[tuple[str, tuple[Any, ...]] | None] = queue.Queue()
        self._thread: threading.Thread | None = None

    def __bool__(self) -> bool:
        return bool(self.trackers)

    @property
    def names(self) -> list[str]:
        return [_name(t) for t in self.trackers]

    def start(
        self, run_dir: Path, config: dict[str, Any], choices: dict[str, str], resumed: bool
    ) -> None:
        """Connect each tracker, here and now, before training starts: its imports, database
        set-up and server probe (bounded by its timeout) would otherwise compete with the
        training loop for the interpreter. Everything after this runs in the background."""
        from contrastive_cli.progress import Task

        self.run_dir = run_dir
        for tracker in list(self.trackers):
            with Task(f"starting tracker={_name(tracker)}"):  # MLflow's first start: ~30 s
                self._call(
                    tracker, "start", (run_dir, config, dict(choices), resumed), self.trackers
                )

    def log_step(self, step: int, values: dict[str, float]) -> None:
        self._put("log_step", step, dict(values))

    def log_epoch(self, record: dict[str, Any]) -> None:
        self._put("log_epoch", dict(record))

    def log_embedding(self, sample: EmbeddingSample | None, step: int) -> None:
        if sample is not None:
            self._put("log_embedding", sample, step)

    def finish(
        self,
        status: str,
        results: dict[str, Any],
        run_dir: Path,
        timeout_s: float = FINISH_TIMEOUT_S,
    ) -> None:
        """Log the end of the run and wait (at most ``timeout_s``) until every call is done."""
        if not self.trackers:
            return
        self._put("finish", status, dict(results), run_dir)
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                log.warning(
                    f"warning: tracking ({', '.join(self.names)}) did not finish within "
                    f"{timeout_s:.0f} s; the run's results are in {run_dir}"
                )
        self.trackers = []

    def _put(self, method: str, *args: Any) -> None:
        if not self.trackers:
            return
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._work, name="contrast-tracking", daemon=True
            )
            self._thread.start()
        self._queue.put((method, args))

    def _work(self) -> None:
        active = list(self.trackers)
        while (item := self._queue.get()) is not None:
            method, args = item
            for tracker in list(active):
                self._call(tracker, method, args, active)

    def _call(self, tracker: Tracker, method: str, args: tuple[Any, ...], active: list) -> None:
        """``tracker.method(*args)``; if it raises: one warning line, and no more calls to it."""
        try:
            getattr(tracker, method)(*args)
        except Exception as e:
            active.remove(tracker)
            where = f" (results in {self.run_dir})" if self.run_dir else ""
            log.warning(
                f"warning: tracker={_name(tracker)}: {one_line(e)}; the run goes on without it{where}"
            )
            with contextlib.suppress(Exception):  # local resources only: no network
                getattr(tracker, "close", lambda: None)()


def _name(tracker: object) -> str:
    return str(getattr(tracker, "name", type(tracker).__name__))


def build_trackers(cfg: DictConfig, rank: int | None = None) -> Trackers:
    """The trackers ``cfg.tracker`` selects (none when the key is absent or empty). Only
    process rank 0 tracks; ``rank`` None reads it from $RANK (torchrun), else 0."""
    from contrastive_cli.config import build

    if rank is None:
        from contrastive_cli.distributed import place_from_env

        place = place_from_env()  # checked: a RANK that is no number is one line there
        rank = 0 if place is None else place.rank
    node = cfg.get("tracker")
    if not node or rank != 0:
        return Trackers()
    trackers = []
    for name in node:
        tracker = build(node[name])
        if not all(callable(getattr(tracker, m, None)) for m in METHODS):
            raise ConfigError(
                f"tracker.{name} is not allowed: it builds no tracker (a _target_ whose object "
                f"has {', '.join(METHODS)}); allowed: tracker=<option>, as in conf/tracker/"
            )
        trackers.append(tracker)
    return Trackers(trackers)

"""Progress for anything a person waits on for more than a couple of seconds.

``with task("t-SNE of 2,000 test features"):`` around opaque work, or
``with task("probe fits", total=6, unit="fit") as t: ... t.update()`` around counted work:

- on a terminal (stderr is a tty): a tqdm bar on stderr, as the training epochs always had;
  an opaque task's bar shows its elapsed time, refreshed every second;
- elsewhere (nohup, SLURM, a pipe): a timestamped line on stderr every ``trainer.log_every_s``
  seconds while the task runs (``configure``), and nothing for a task that ends sooner.

Tasks nest (an evaluator inside an evaluated entry): off a terminal only the innermost one
prints, its line prefixed with the names of the tasks around it. The lines go to the stream a
bar would use, not to train.log, which keeps the run's milestones (one line per epoch, one
before and after each evaluated entry).
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

from tqdm import tqdm

DEFAULT_EVERY_S = 30.0  # for commands without a run config; runs take trainer.log_every_s
TERMINAL_REFRESH_S = 1.0  # an opaque task's bar: how often its elapsed time is redrawn
_settings: dict[str, Any] = {"every_s": DEFAULT_EVERY_S, "stream": None}
_active: list[Task] = []  # the tasks now running, outermost first
_lock = threading.Lock()


def configure(every_s: float | None = None, stream: TextIO | None = None) -> None:
    """Seconds between progress lines off a terminal (``trainer.log_every_s``; None, as in
    configs older than it: ``DEFAULT_EVERY_S``) and the stream (None: stderr as it is when
    each task starts)."""
    _settings["every_s"] = DEFAULT_EVERY_S if every_s is None else float(every_s)
    _settings["stream"] = stream


def on_terminal(stream: TextIO) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or not a file
        return False


class Task:
    """One piece of work in progress; ``update`` counts it, ``note`` shows values beside it."""

    def __init__(
        self, desc: str, total: int | None = None, unit: str = "it", initial: int = 0
    ) -> None:
        self.desc, self.total, self.unit, self.done = desc, total, unit, initial
        self.values: dict[str, str] = {}
        self.stream: TextIO = _settings["stream"] or sys.stderr
        self.terminal = on_terminal(self.stream)
        self.started = time.perf_counter()
        self.bar: tqdm | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)

    def note(self, **values: str) -> None:
        """Values shown after the count (the loss, images/s), replacing the earlier ones."""
        self.values = dict(values)
        if self.bar is not None:
            self.bar.set_postfix(values)

    def line(self) -> str:
        """The timestamped line printed off a terminal."""
        with _lock:
            outer = [t.desc for t in _active[: _active.index(self)]] if self in _active else []
        elapsed = time.perf_counter() - self.started
        if self.total:
            state = f"{self.done:,}/{self.total:,} {self.unit}s ({self.done / self.total:.0%})"
        else:
            state = f"{self.done:,} {self.unit}s" if self.done else "running"
        extra = "".join(f", {k} {v}" for k, v in self.values.items())
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        return f"{stamp} {': '.join([*outer, self.desc])}: {state}, {elapsed:.0f} s{extra}"

    def __enter__(self) -> Task:
        with _lock:
            _active.append(self)
        if self.terminal:
            self.bar = tqdm(
                total=self.total,
                initial=self.done,
                desc=self.desc,
                unit=self.unit,
                leave=False,
                file=self.stream,
                dynamic_ncols=True,
                # Work that cannot be counted: its name and the time it has taken so far.
                bar_format=None if self.total else "{desc}: {elapsed}",
            )
        if not self.terminal or self.total is None:
            self._thread = threading.Thread(
                target=self._tick, name="contrast-progress", daemon=True
            )
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        with _lock:
            if self in _active:
                _active.remove(self)

    def _tick(self) -> None:
        every = TERMINAL_REFRESH_S if self.terminal else max(_settings["every_s"], 1e-3)
        while not self._stop.wait(every):
            if self.bar is not None:
                self.bar.refresh()
                continue
            with _lock:
                innermost = bool(_active) and _active[-1] is self
            if innermost:
                print(self.line(), file=self.stream, flush=True)


@contextmanager
def task(desc: str, total: int | None = None, unit: str = "it", initial: int = 0) -> Iterator[Task]:
    """A ``Task`` for the duration of the block (see the module's docstring)."""
    with Task(desc, total, unit, initial) as t:
        yield t

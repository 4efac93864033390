"""Stopping a run cleanly on SIGINT/SIGTERM.

While the training loop runs (``graceful`` is true), the first signal asks it to finish
its current step, write a checkpoint and exit with 128 + the signal number (130 for
Ctrl-C, 143 for SIGTERM). A second signal, or any signal outside the loop (loading data,
final evaluation: nothing to save then), stops at once; checkpoints are written
atomically, so that cannot corrupt one.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path
from types import FrameType


class Interrupted(BaseException):
    """Raised out of a run that a signal stopped. A BaseException so that nothing meant
    for errors (a sweep's per-job error handling, Hydra's reporting) swallows it."""

    def __init__(self, signum: int, message: str = ""):
        super().__init__(message or f"stopped by {signal.Signals(signum).name}")
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class GracefulStop:
    """Context manager: handle SIGINT/SIGTERM while training; ``requested`` says if one came."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, checkpoint: Path | None = None) -> None:
        self.checkpoint = checkpoint  # what an immediate stop leaves to resume from
        self.signum: int | None = None
        self.graceful = False
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is not None or not self.graceful:
            self.signum = signum
            saved = self.checkpoint is not None and (
                self.checkpoint.exists() or self.checkpoint.with_name("prev.pt").exists()
            )
            raise Interrupted(
                signum,
                f"stopped at once by {signal.Signals(signum).name}; "
                + (
                    "the last checkpoint is intact"
                    if saved
                    else "no checkpoint had been written yet (the run starts over when resumed)"
                ),
            )
        self.signum = signum
        print(
            f"\n{signal.Signals(signum).name}: finishing this step and saving a checkpoint "
            "(send it again to stop at once)",
            flush=True,
        )

    def __enter__(self) -> GracefulStop:
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)  # type: ignore[arg-type]
        self._previous.clear()

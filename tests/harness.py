"""Run the `contrast` CLI with a fault injected, for the fault-injection tests.

    python -m tests.harness FAULT N -- <contrast arguments>

FAULT is one of
  kill-in-step N   SIGKILL this process in the middle of training step N (between its two
                   augmented views, so the step's forward/backward never completes)
  kill-in-save N   SIGKILL this process half way through writing checkpoint number N
                   (half the bytes on disk, not yet renamed into place)
The faults are patched in here, in the test harness; the package has no fault hooks.
"""

from __future__ import annotations

import io
import os
import signal
import sys

import torch

from contrastive_cli import checkpoint
from contrastive_cli.cli import main
from contrastive_cli.data.augment import Augment


def _die() -> None:
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def kill_in_step(n: int) -> None:
    original = Augment.__call__
    calls = {"count": 0}

    def patched(self, x, generator, *args, **kwargs):
        calls["count"] += 1
        if calls["count"] == 2 * (n - 1) + 2:  # the second view of step n
            _die()
        return original(self, x, generator, *args, **kwargs)

    Augment.__call__ = patched  # type: ignore[method-assign]


def kill_in_save(n: int) -> None:
    original = torch.save
    saves = {"count": 0}

    def patched(obj, f, *args, **kwargs):
        saves["count"] += 1
        if saves["count"] == n and hasattr(f, "write"):
            buffer = io.BytesIO()
            original(obj, buffer, *args, **kwargs)
            data = buffer.getvalue()
            f.write(data[: len(data) // 2])
            f.flush()
            os.fsync(f.fileno())
            _die()
        return original(obj, f, *args, **kwargs)

    checkpoint.torch.save = patched  # type: ignore[attr-defined]


FAULTS = {"kill-in-step": kill_in_step, "kill-in-save": kill_in_save}

if __name__ == "__main__":
    fault, n, separator, *args = sys.argv[1:]
    assert separator == "--", __doc__
    FAULTS[fault](int(n))
    sys.exit(main(args))

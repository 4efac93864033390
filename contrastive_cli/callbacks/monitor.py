"""k-NN accuracy during training, every ``eval.every`` epochs and after the last one."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from contrastive_cli.events import Callback, Loop


class Monitor(Callback):
    """Adds ``knn`` to the epoch's record. ``knn`` is a ``KnnMonitor`` (or any function of
    the encoder); it runs before the time budget, which counts its time."""

    def __init__(self, knn: Callable[[nn.Module], float], every: int):
        self.knn, self.every = knn, every

    def epoch_end(self, loop: Loop, record: dict[str, Any]) -> None:
        epoch = loop.progress.epoch
        if epoch % self.every == 0 or epoch == loop.epochs:
            record["knn"] = self.knn(loop.method.encoder)

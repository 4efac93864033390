"""k-NN accuracy and the label-free metrics during training, every ``eval.every`` epochs and
after the last one."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from contrastive_cli.events import Callback, Loop
from contrastive_cli.labelfree import projector_of


class Monitor(Callback):
    """Adds ``knn`` to the epoch's record, and ``rankme`` (``rankme_projector``),
    ``alignment`` and ``uniformity`` where ``labelfree`` is given. ``knn`` is a
    ``KnnMonitor`` (or any function of the encoder; None without labels), ``labelfree`` a
    ``LabelFreeMonitor`` (a function of the encoder and the method's projector). They run
    before the time budget, which counts their time."""

    def __init__(
        self,
        knn: Callable[[nn.Module], float] | None,
        every: int,
        labelfree: Callable[[nn.Module, nn.Module | None], dict[str, float]] | None = None,
    ):
        self.knn, self.every, self.labelfree = knn, every, labelfree

    def epoch_end(self, loop: Loop, record: dict[str, Any]) -> None:
        epoch = loop.progress.epoch
        if epoch % self.every == 0 or epoch == loop.epochs:
            if self.knn is not None:
                record["knn"] = self.knn(loop.method.encoder)
            if self.labelfree is not None:
                projector = projector_of(loop.method)
                record.update(self.labelfree(loop.method.encoder, projector))

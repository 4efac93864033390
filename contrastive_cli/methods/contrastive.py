"""The pairwise contrastive (margin) loss of Hadsell, Chopra & LeCun (2006): encoder ->
projector; positives pulled together, negatives pushed beyond a margin."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from contrastive_cli.distributed import Gather, all_gather
from contrastive_cli.losses.contrastive import Distance, contrastive_loss
from contrastive_cli.methods import Positives, positive_ids
from contrastive_cli.schema import Positive


class Contrastive(nn.Module):
    """Positives are the two views of one image (``positives=views``) or any two samples of
    one class (``positives=labels``, which needs labelled data); every other pair is a
    negative. Pairs come from every process through ``gather``."""

    def __init__(
        self,
        encoder: nn.Module,
        projector: Callable[[int], nn.Module],
        margin: Positive = 1.0,
        distance: Distance = "euclidean",
        positives: Positives = "views",
        gather: Gather = all_gather,  # the identity in one process
    ):
        super().__init__()
        if positives not in ("views", "labels"):
            raise ValueError(f"loss.positives must be views or labels, got {positives!r}")
        if distance not in ("euclidean", "cosine"):
            raise ValueError(f"loss.distance must be euclidean or cosine, got {distance!r}")
        if margin <= 0:
            raise ValueError(f"loss.margin must be > 0, got {margin}")
        self.encoder = encoder
        self.projector = projector(encoder.out_dim)
        self.margin = margin
        self.distance = distance
        self.positives = positives
        self.gather = gather

    def forward(self, views: Sequence[Tensor], labels: Tensor | None = None) -> Tensor:
        view1, view2 = views[0], views[1]
        ids = positive_ids(self.positives, view1, labels, self.gather)
        z = self.projector(self.encoder(torch.cat([view1, view2])))  # (2N, D)
        return contrastive_loss(z, torch.cat([ids, ids]), self.margin, self.distance, self.gather)

    def after_step(self, step: int, total_steps: int) -> None:
        pass

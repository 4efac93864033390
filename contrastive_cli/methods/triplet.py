"""Triplet: encoder -> projector, in-batch mined triplets over both views."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from contrastive_cli.distributed import Gather, all_gather
from contrastive_cli.losses.triplet import Mining, triplet_loss
from contrastive_cli.methods import Positives, positive_ids
from contrastive_cli.schema import NonNegative


class Triplet(nn.Module):
    """Anchor and positive are two views of one image (``positives=views``) or any two
    samples of one class (``positives=labels``, which needs labelled data)."""

    def __init__(
        self,
        encoder: nn.Module,
        projector: Callable[[int], nn.Module],
        margin: NonNegative = 0.2,
        mining: Mining = "semihard",
        positives: Positives = "views",
        gather: Gather = all_gather,  # the identity in one process
    ):
        super().__init__()
        if positives not in ("views", "labels"):
            raise ValueError(f"loss.positives must be views or labels, got {positives!r}")
        self.encoder = encoder
        self.projector = projector(encoder.out_dim)
        self.margin = margin
        self.mining = mining
        self.positives = positives
        self.gather = gather

    def forward(self, views: Sequence[Tensor], labels: Tensor | None = None) -> Tensor:
        view1, view2 = views[0], views[1]
        ids = positive_ids(self.positives, view1, labels, self.gather)
        z = self.projector(self.encoder(torch.cat([view1, view2])))
        return triplet_loss(z, torch.cat([ids, ids]), self.margin, self.mining, self.gather)

    def after_step(self, step: int, total_steps: int) -> None:
        pass

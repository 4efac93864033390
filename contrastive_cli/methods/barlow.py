"""Barlow Twins: encoder -> projector; the cross-correlation of the two views' projections
over the global batch is pushed towards the identity (Zbontar et al., 2021)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from contrastive_cli.distributed import Gather, all_gather
from contrastive_cli.losses.barlow import barlow_twins_loss
from contrastive_cli.schema import NonNegative, Positive


class BarlowTwins(nn.Module):
    """Batch statistics (means, variances, the D x D correlation) are over every process's
    rows through ``gather``; see ``losses.barlow`` for why nothing is divided by the number
    of processes."""

    def __init__(
        self,
        encoder: nn.Module,
        projector: Callable[[int], nn.Module],
        lambda_offdiag: NonNegative = 0.0051,
        scale: Positive = 1.0,
        gather: Gather = all_gather,  # the identity in one process
    ):
        super().__init__()
        if lambda_offdiag < 0:
            raise ValueError(f"loss.lambda_offdiag must be >= 0, got {lambda_offdiag}")
        if scale <= 0:
            raise ValueError(f"loss.scale must be > 0, got {scale}")
        self.encoder = encoder
        self.projector = projector(encoder.out_dim)
        self.lambda_offdiag = lambda_offdiag
        self.scale = scale
        self.gather = gather

    def forward(self, views: Sequence[Tensor], labels: Tensor | None = None) -> Tensor:
        z1, z2 = self.projector(self.encoder(torch.cat([views[0], views[1]]))).chunk(2)
        return barlow_twins_loss(z1, z2, self.lambda_offdiag, self.scale, gather=self.gather)

    def after_step(self, step: int, total_steps: int) -> None:
        pass

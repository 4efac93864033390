"""SimSiam's negative cosine similarity with a stop-gradient (Chen & He, 2021)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from contrastive_cli.losses.precision import full_precision, upcast


def simsiam_loss(p: Tensor, z: Tensor) -> Tensor:
    """D(p, z) = -mean_n cos(p_n, stopgrad(z_n)), SimSiam eq. 1 with eq. 3's stop-gradient.

    Args:
        p: (N, D) predictor outputs of one view (gradient flows through these).
        z: (N, D) projections of the other view; treated as constants.
    The symmetric SimSiam objective is 0.5 * (simsiam_loss(p1, z2) + simsiam_loss(p2, z1)),
    in [-1, 1]; -1 when every prediction points along its target. Per-sample, so the mean of
    equal-sized processes' losses is the whole batch's: no gather needed.
    """
    if p.shape != z.shape or p.dim() != 2:
        raise ValueError(
            f"p and z must be (N, D) of one shape, got {tuple(p.shape)}, {tuple(z.shape)}"
        )
    with full_precision(p):
        p = F.normalize(upcast(p), dim=1)
        z = F.normalize(upcast(z.detach()), dim=1)
        return -(p * z).sum(dim=1).mean()

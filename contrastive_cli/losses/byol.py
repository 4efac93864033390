"""BYOL's regression loss (Grill et al., 2020)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from contrastive_cli.losses.precision import float32_math


@float32_math
def byol_loss(p: Tensor, z: Tensor) -> Tensor:
    """Mean over rows of 2 - 2 cos(p_n, z_n): the squared distance of the unit vectors.

    Args:
        p: (N, D) online predictions.
        z: (N, D) target projections of the other view; treated as constants.
    The symmetric BYOL objective is byol_loss(p1, z2) + byol_loss(p2, z1).
    """
    p = F.normalize(p, dim=1)
    z = F.normalize(z.detach(), dim=1)
    return (2 - 2 * (p * z).sum(dim=1)).mean()

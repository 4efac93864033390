"""NNCLR's loss: a view's nearest neighbour in a support set is the positive of the other
view's prediction (Dwibedi et al., 2021, "With a Little Help from My Friends")."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from contrastive_cli.distributed import Gather, local_only
from contrastive_cli.losses.precision import float32_math


@torch.no_grad()
def nearest_neighbours(z: Tensor, support: Tensor) -> Tensor:
    """NN(z, Q): for each row of ``z`` (N, D), the row of ``support`` (Q, D) of largest cosine
    similarity, L2-normalised (N, D); constants (no gradient), as the paper's support set."""
    support = F.normalize(support.detach().to(z.dtype), dim=1)
    index = (F.normalize(z.detach(), dim=1) @ support.T).argmax(dim=1)  # (N,)
    return support[index]


@float32_math
def nnclr_loss(
    z1: Tensor,
    z2: Tensor,
    p1: Tensor,
    p2: Tensor,
    support: Tensor,
    temperature: float = 0.1,
    gather: Gather = local_only,
) -> Tensor:
    """The paper's symmetric loss (Algorithm 1), over the global batch:

        NN(z) = argmax_{q in Q} cos(z, q)                       (a support-set row; constant)
        L(a, p) = -1/N sum_i log( exp(a_i.p_i / T) / sum_k exp(a_i.p_k / T) ),  unit rows
        loss = L(NN(z1), p2) / 2 + L(NN(z2), p1) / 2

    Args:
        z1, z2: (N, D) projections of the two views: they only pick the neighbours.
        p1, p2: (N, D) their predictions (the gradient flows through these).
        support: (Q, D) the support set (the method's queue of past projections), read
            before this step's projections are added.
        temperature: T > 0 (the paper's 0.1).
        gather: every process's rows (``contrastive_cli.distributed``): anchors NN(z_i) are
            local, the candidates p_k come from the global batch (as solo-learn's
            ``nnclr_loss_func``), so the mean over processes is the whole batch's loss.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")

    def one_way(z: Tensor, p: Tensor) -> Tensor:
        anchors = nearest_neighbours(z, support)  # (N, D)
        candidates, offset = gather(F.normalize(p, dim=1))  # (M, D)
        logits = anchors @ candidates.T / temperature  # (N, M)
        positive = torch.arange(z.shape[0], device=z.device) + offset
        return F.cross_entropy(logits, positive)

    return (one_way(z1, p2) + one_way(z2, p1)) / 2

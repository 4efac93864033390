"""MoCo v3's symmetric InfoNCE over the global batch, no queue (Chen, Xie & He, 2021,
"An Empirical Study of Training Self-Supervised Vision Transformers")."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from contrastive_cli.distributed import Gather, local_only
from contrastive_cli.losses.precision import float32_math


@float32_math
def mocov3_loss(
    q1: Tensor,
    q2: Tensor,
    k1: Tensor,
    k2: Tensor,
    temperature: float = 0.2,
    gather: Gather = local_only,
) -> Tensor:
    """The paper's Algorithm 1:

        ctr(q, k) = 2T * mean_n -log( exp(q_n.k_n / T) / sum_m exp(q_n.k_m / T) ),  unit rows
        loss = ctr(q1, k2) + ctr(q2, k1)

    m runs over the keys of the global batch (the authors' ``concat_all_gather``); the
    factor 2T is the paper's (it makes the loss's scale independent of T).

    Args:
        q1, q2: (N, D) the queries: the base encoder's predictions of the two views.
        k1, k2: (N, D) the keys: the momentum encoder's projections; constants.
        temperature: T > 0 (the paper's 0.2 for ViTs, 1.0 for ResNets; solo-learn CIFAR 0.2).
        gather: every process's rows (``contrastive_cli.distributed``); queries are local,
            so the mean over processes is the whole batch's loss.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")

    def ctr(q: Tensor, k: Tensor) -> Tensor:
        q = F.normalize(q, dim=1)
        keys, offset = gather(F.normalize(k.detach(), dim=1))  # (M, D)
        logits = q @ keys.T / temperature  # (N, M)
        positive = torch.arange(q.shape[0], device=q.device) + offset
        return F.cross_entropy(logits, positive) * 2 * temperature

    return ctr(q1, k2) + ctr(q2, k1)

"""InfoNCE against a queue of past keys, as in MoCo v2 (He et al., 2020; Chen et al., 2020)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from contrastive_cli.losses.precision import float32_math


@float32_math
def moco_infonce(q: Tensor, k: Tensor, queue: Tensor, temperature: float) -> Tensor:
    """Mean InfoNCE of queries against their keys (positives) and the queue (negatives).

        l(n) = -log( exp(q_n.k_n / T) / (exp(q_n.k_n / T) + sum_j exp(q_n.queue_j / T)) )

    Args:
        q: (N, D) query embeddings (gradient flows through these).
        k: (N, D) key embeddings from the momentum encoder; treated as constants.
        queue: (K, D) keys of earlier batches, read before this batch's keys are added.
        temperature: T > 0.
    All inputs are L2-normalised here, so callers may pass raw projections.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    q = F.normalize(q, dim=1)
    k = F.normalize(k.detach(), dim=1)
    queue = F.normalize(queue.detach(), dim=1)
    positive = (q * k).sum(dim=1, keepdim=True)  # (N, 1)
    negative = q @ queue.T  # (N, K)
    logits = torch.cat([positive, negative], dim=1) / temperature  # (N, 1+K)
    target = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)  # positive is column 0
    return F.cross_entropy(logits, target)

"""NT-Xent, the normalised temperature-scaled cross-entropy of SimCLR (Chen et al., 2020)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from contrastive_cli.distributed import Gather, local_only
from contrastive_cli.losses.precision import float32_math


@float32_math
def nt_xent(z1: Tensor, z2: Tensor, temperature: float, gather: Gather = local_only) -> Tensor:
    """Mean NT-Xent over the 2N local views.

    For a view i with positive j (the other view of the same image), over all other views k:
        l(i) = -log( exp(s_ij / T) / sum_{k != i} exp(s_ik / T) ),  s = cosine similarity.

    Args:
        z1: (N, D) embeddings of the first views.
        z2: (N, D) embeddings of the second views; row n is the positive of z1's row n.
        temperature: T > 0.
        gather: returns every process's rows and this process's offset (see
            ``contrastive_cli.distributed``); candidates come from all processes, anchors
            are local, so the mean over processes equals the loss of the whole batch.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z1 = F.normalize(z1, dim=1)
    z2 = F.normalize(z2, dim=1)
    n = z1.shape[0]
    all_z1, offset = gather(z1)
    all_z2, _ = gather(z2)
    m = all_z1.shape[0]
    anchors = torch.cat([z1, z2])  # (2N, D)
    candidates = torch.cat([all_z1, all_z2])  # (2M, D)
    logits = anchors @ candidates.T / temperature  # (2N, 2M)
    local = torch.arange(n, device=z1.device) + offset  # local rows' index among M
    self_index = torch.cat([local, local + m])  # each anchor's own column
    positive = torch.cat([local + m, local])  # the other view's column
    rows = torch.arange(2 * n, device=z1.device)
    logits = logits.index_put((rows, self_index), logits.new_full((), float("-inf")))
    return F.cross_entropy(logits, positive)

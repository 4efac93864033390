"""Triplet loss with in-batch mining (Schroff et al., 2015; Hermans et al., 2017)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from contrastive_cli.distributed import Gather, local_only

Mining = Literal["hard", "semihard", "all"]
MINING: tuple[str, ...] = ("hard", "semihard", "all")


def triplet_loss(
    embeddings: Tensor,
    ids: Tensor,
    margin: float,
    mining: Mining = "semihard",
    gather: Gather = local_only,
) -> Tensor:
    """Triplet loss max(0, d(a,p) - d(a,n) + margin) on L2-normalised embeddings.

    d is the squared Euclidean distance of unit vectors (FaceNet), so it lies in [0, 4].
    Positives of an anchor share its id (two views of one image, or one class); negatives
    have another id. Mining picks the triplets:
      - ``hard`` (batch-hard): per anchor, its farthest positive and nearest negative.
      - ``semihard``: per (anchor, positive) pair, the nearest negative farther than the
        positive; if there is none, the farthest negative (as in TF-Addons).
      - ``all``: every valid (anchor, positive, negative) triplet, averaged.

    Args:
        embeddings: (N, D) local embeddings (anchors).
        ids: (N,) int64 identity of each row.
        margin: >= 0.
        mining: one of ``MINING``.
        gather: candidates (positives and negatives) come from every process.
    Anchors without a positive or a negative do not count. Returns 0 if none remain.
    """
    if mining not in MINING:
        raise ValueError(f"mining must be one of {MINING}, got {mining!r}")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    e = F.normalize(embeddings, dim=1)
    all_e, offset = gather(e)
    all_ids, _ = gather(ids)
    n = e.shape[0]
    dist = (2 - 2 * e @ all_e.T).clamp_min(0)                     # (N, M)
    same = ids[:, None] == all_ids[None, :]                       # (N, M)
    is_self = torch.zeros_like(same)
    is_self[torch.arange(n), torch.arange(n) + offset] = True
    pos_mask = same & ~is_self
    neg_mask = ~same
    valid_anchor = pos_mask.any(1) & neg_mask.any(1)
    zero = embeddings.sum() * 0.0
    if not valid_anchor.any():
        return zero

    if mining == "hard":
        d_ap = dist.masked_fill(~pos_mask, float("-inf")).amax(1)
        d_an = dist.masked_fill(~neg_mask, float("inf")).amin(1)
        return F.relu(d_ap - d_an + margin)[valid_anchor].mean()

    # (N, M_pos, M_neg) would be cubic; work per (anchor, positive) pair instead.
    a_idx, p_idx = pos_mask.nonzero(as_tuple=True)
    keep = valid_anchor[a_idx]
    a_idx, p_idx = a_idx[keep], p_idx[keep]
    d_ap = dist[a_idx, p_idx]                                      # (P,)
    d_an = dist[a_idx]                                             # (P, M)
    negs = neg_mask[a_idx]                                         # (P, M)
    if mining == "all":
        losses = F.relu(d_ap[:, None] - d_an + margin)
        return (losses * negs).sum() / negs.sum()
    farther = negs & (d_an > d_ap[:, None])
    nearest_farther = d_an.masked_fill(~farther, float("inf")).amin(1)
    farthest = d_an.masked_fill(~negs, float("-inf")).amax(1)
    d_neg = torch.where(farther.any(1), nearest_farther, farthest)
    return F.relu(d_ap - d_neg + margin).mean()

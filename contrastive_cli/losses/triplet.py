"""Triplet loss with in-batch mining (Schroff et al., 2015; Hermans et al., 2017)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from contrastive_cli.distributed import Gather, global_mean, local_only
from contrastive_cli.losses.precision import full_precision, upcast

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
    # float32 even under bf16 autocast: rounded distances tie and change the mined negatives.
    with full_precision(embeddings):
        return _mined(upcast(embeddings), ids, margin, mining, gather)


def _mined(embeddings: Tensor, ids: Tensor, margin: float, mining: str, gather: Gather) -> Tensor:
    e = F.normalize(embeddings, dim=1)
    all_e, offset = gather(e)
    all_ids, _ = gather(ids)
    n = e.shape[0]
    dist = (2 - 2 * e @ all_e.T).clamp_min(0)  # (N, M)
    same = ids[:, None] == all_ids[None, :]  # (N, M)
    is_self = torch.zeros_like(same)
    local = torch.arange(n, device=e.device)
    is_self[local, local + offset] = True
    pos_mask = same & ~is_self
    neg_mask = ~same
    valid_anchor = pos_mask.any(1) & neg_mask.any(1)
    # Hard and semi-hard mining stay on the device: no data-dependent shapes or branches, so
    # no host sync per step on a GPU. Empty selections give 0 (with a zero gradient).
    processes = all_e.shape[0] // max(n, 1)

    def mean(values: Tensor, mask: Tensor) -> Tensor:
        """Over every process's terms (``global_mean``); 0 where ``mask`` holds nowhere
        (values there may be inf, so they are replaced rather than multiplied by 0)."""
        total = torch.where(mask, values, torch.zeros_like(values)).sum()
        return global_mean(total, mask.sum(), gather, processes)

    if mining == "hard":
        d_ap = dist.masked_fill(~pos_mask, float("-inf")).amax(1)
        d_an = dist.masked_fill(~neg_mask, float("inf")).amin(1)
        return mean(F.relu(d_ap - d_an + margin), valid_anchor)
    pairs = pos_mask & valid_anchor[:, None]  # (N, M) anchor-positive pairs
    if mining == "semihard":
        # Per anchor, its negatives' distances in ascending order (non-negatives last, as inf):
        # the first one above d(a, p) is the nearest farther negative of the pair (a, p).
        neg_sorted = dist.masked_fill(~neg_mask, float("inf")).sort(1).values  # (N, M)
        n_neg = neg_mask.sum(1, keepdim=True)  # (N, 1)
        first = torch.searchsorted(neg_sorted, dist, right=True)  # (N, M)
        nearest_farther = neg_sorted.gather(1, first.clamp(max=dist.shape[1] - 1))
        farthest = neg_sorted.gather(1, (n_neg - 1).clamp(min=0)).expand_as(dist)
        d_neg = torch.where(first < n_neg, nearest_farther, farthest)
        return mean(F.relu(dist - d_neg + margin), pairs)

    # "all": (N, M_pos, M_neg) would be cubic; work per (anchor, positive) pair instead.
    # No early return when there are none: every process must make the same gathers.
    a_idx, p_idx = pairs.nonzero(as_tuple=True)
    d_ap = dist[a_idx, p_idx]  # (P,)
    d_an = dist[a_idx]  # (P, M)
    negs = neg_mask[a_idx]  # (P, M)
    losses = F.relu(d_ap[:, None] - d_an + margin)
    return mean(losses, negs) + 0.0 * embeddings.sum()  # a graph even when P = 0

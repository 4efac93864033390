"""The pairwise contrastive (margin) loss of Hadsell, Chopra & LeCun (2006)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from contrastive_cli.distributed import Gather, global_mean, local_only
from contrastive_cli.losses.precision import full_precision, upcast

Distance = Literal["euclidean", "cosine"]
DISTANCES: tuple[str, ...] = ("euclidean", "cosine")


def contrastive_loss(
    embeddings: Tensor,
    ids: Tensor,
    margin: float,
    distance: Distance = "euclidean",
    gather: Gather = local_only,
) -> Tensor:
    """1/2 mean over positive pairs of d^2 + 1/2 mean over negative pairs of max(0, m - d)^2.

    The paper's eq. 4 per pair: (1 - Y) 1/2 D^2 + Y 1/2 max(0, m - D)^2 (Y = 1: dissimilar).
    We keep its 1/2s, so a pair's term is the paper's. Pairs are (anchor, other row): the
    anchors are the local rows, the others every row of every process but the anchor itself;
    positives share the anchor's id (two views of one image, or one class), negatives do not.

    Averaging: each kind of pair is averaged on its own and the two means added. In a batch
    of N images with two views there are 2N positive pairs and about 4N^2 negative ones; a
    plain mean over all pairs would weight the attraction by ~1/(2N) and the model would
    mostly spread points apart. Equal weights make the loss independent of the batch size;
    most negatives are beyond the margin and contribute 0 (the hinge does the mining).

    d is one of:
      - ``euclidean``: ||a - b|| of the L2-normalised embeddings, in [0, 2] (margin <= 2);
      - ``cosine``: 1 - cos(a, b), in [0, 2].
    The euclidean positive term d^2 = 2 - 2 cos is computed without the square root; where
    d = 0 the negative term's root is left out, so two identical negatives give a zero
    gradient (there is no direction to push them apart) rather than an infinite one.

    Args:
        embeddings: (N, D) local embeddings.
        ids: (N,) int64; equal ids are positives. Ids must be unique across processes for
            two-view positives (as ``methods.triplet`` makes them).
        margin: m > 0.
        distance: one of ``DISTANCES``.
        gather: candidates and their ids come from every process, and each mean is over
            every process's pairs (``distributed.global_mean``), so the mean of the
            processes' losses is the whole batch's, also when same-class positives make
            the number of pairs differ between processes.
    A kind of pair that does not occur contributes 0.
    """
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
    if margin <= 0:
        raise ValueError(f"margin must be > 0, got {margin}")
    if embeddings.dim() != 2 or ids.shape != embeddings.shape[:1]:
        raise ValueError(
            f"embeddings must be (N, D) and ids (N,), got {tuple(embeddings.shape)}, {tuple(ids.shape)}"
        )
    with full_precision(embeddings):
        e = F.normalize(upcast(embeddings), dim=1)
        all_e, offset = gather(e)
        all_ids, _ = gather(ids)
        n = e.shape[0]
        similarity = e @ all_e.T  # (N, M)
        if distance == "euclidean":
            squared = (2 - 2 * similarity).clamp_min(0)
            positive_term = squared
            positive_d2 = squared > 0
            d = torch.where(positive_d2, torch.where(positive_d2, squared, 1.0).sqrt(), 0.0)
        else:
            d = 1 - similarity
            positive_term = d.pow(2)
        negative_term = F.relu(margin - d).pow(2)
        same = ids[:, None] == all_ids[None, :]  # (N, M)
        local = torch.arange(n, device=e.device)
        is_self = torch.zeros_like(same).index_put((local, local + offset), same.new_ones(()))
        processes = all_e.shape[0] // max(n, 1)

        def mean(values: Tensor, mask: Tensor) -> Tensor:
            """Over every process's pairs (``global_mean``); 0 where ``mask`` holds nowhere."""
            total = torch.where(mask, values, torch.zeros_like(values)).sum()
            return global_mean(total, mask.sum(), gather, processes)

        return 0.5 * mean(positive_term, same & ~is_self) + 0.5 * mean(negative_term, ~same)

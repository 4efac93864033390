"""Supervised contrastive loss, L_out (Khosla et al., 2020)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from contrastive_cli.distributed import Gather, local_only
from contrastive_cli.losses.precision import full_precision, upcast


def supcon_loss(
    z1: Tensor,
    z2: Tensor,
    labels: Tensor,
    temperature: float = 0.1,
    gather: Gather = local_only,
) -> Tensor:
    """Mean over anchors of the paper's eq. 2 (L_out: the mean over positives outside the log):

        l(i) = -1/|P(i)| sum_{p in P(i)} log( exp(s_ip / T) / sum_{a in A(i)} exp(s_ia / T) )

    over the 2N local views as anchors i and the 2M views of all processes as candidates:
    A(i) = every view but i itself, P(i) = the views in A(i) with i's label (always including
    i's other view), s = cosine similarity. The paper sums over anchors; the mean (as in the
    authors' code) keeps the scale independent of the batch size. The authors' code also
    multiplies by T / base_temperature (0.07); not the paper's formula, and 1 at T = 0.07.
    With labels unique per image (P(i) = the other view) it is SimCLR's NT-Xent.

    Args:
        z1, z2: (N, D) embeddings of the two views; row n of both is image n.
        labels: (N,) int64 class of each image.
        temperature: T > 0; the paper's 0.1.
        gather: candidates (embeddings and labels) come from every process, anchors are
            local; anchors with no positive are left out (none with two views). The mean of
            the processes' losses is the whole batch's when every process has as many anchors
            with positives (always true with two views and equal local batches).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if z1.shape != z2.shape or z1.dim() != 2 or labels.shape != z1.shape[:1]:
        raise ValueError(
            f"z1, z2 must be (N, D) and labels (N,), got {tuple(z1.shape)}, {tuple(z2.shape)}, "
            f"{tuple(labels.shape)}"
        )
    with full_precision(z1):
        z1 = F.normalize(upcast(z1), dim=1)
        z2 = F.normalize(upcast(z2), dim=1)
        n = z1.shape[0]
        all_z1, offset = gather(z1)
        all_z2, _ = gather(z2)
        all_labels, _ = gather(labels)
        m = all_z1.shape[0]
        anchors = torch.cat([z1, z2])  # (2N, D)
        candidates = torch.cat([all_z1, all_z2])  # (2M, D)
        logits = anchors @ candidates.T / temperature  # (2N, 2M)
        local = torch.arange(n, device=z1.device) + offset
        self_index = torch.cat([local, local + m])  # each anchor's own column
        rows = torch.arange(2 * n, device=z1.device)
        logits = logits.index_put((rows, self_index), logits.new_full((), float("-inf")))
        log_prob = logits - logits.logsumexp(dim=1, keepdim=True)  # (2N, 2M), -inf at self
        positive = torch.cat([labels, labels])[:, None] == torch.cat([all_labels, all_labels])
        positive = positive.index_put((rows, self_index), positive.new_zeros(()))
        n_positive = positive.sum(dim=1)  # (2N,)
        per_anchor = -log_prob.masked_fill(~positive, 0.0).sum(dim=1) / n_positive.clamp_min(1)
        has_positive = n_positive > 0
        return (per_anchor * has_positive).sum() / has_positive.sum().clamp_min(1)

"""Barlow Twins' redundancy-reduction loss (Zbontar et al., 2021)."""

from __future__ import annotations

import torch
from torch import Tensor

from contrastive_cli.distributed import Gather, local_only
from contrastive_cli.losses.precision import full_precision, upcast


def barlow_twins_loss(
    z1: Tensor,
    z2: Tensor,
    lambda_offdiag: float = 0.0051,
    scale: float = 1.0,
    eps: float = 1e-5,
    gather: Gather = local_only,
) -> Tensor:
    """scale * ( sum_i (1 - C_ii)^2 + lambda * sum_{i != j} C_ij^2 ), the paper's eq. 1.

    C = Z1^T Z2 / M (D, D) is the cross-correlation of the two views' embeddings, each
    standardised per dimension over the M rows of the global batch:
    z_n = (z_n - mean) / sqrt(var + eps), with the biased variance and eps of
    ``BatchNorm1d(affine=False)`` as in the authors' code. lambda = 0.0051 is the paper's
    (chosen for D = 8192). ``scale`` multiplies the whole loss; 1 is the paper. The loss grows
    about linearly with D (D diagonal terms; lambda ~ 1/D keeps the off-diagonal part in
    proportion), so for a plain SGD step a different D changes the effective learning rate;
    solo-learn multiplies by ``scale_loss`` (0.1 for CIFAR at D = 2048) for that, and the
    authors' first release had ``--scale-loss``. A general factor covers a 1/D scaling
    (scale = 1/D) and those recipes, so there is no separate 1/D switch. LARS (the paper's
    optimizer) is nearly invariant to it: only the biases and norm parameters it leaves
    unadapted see the factor.

    Args:
        z1, z2: (N, D) local projections of the two views; row n of each is one image.
        lambda_offdiag: weight of the off-diagonal (redundancy) terms, >= 0.
        scale: > 0, multiplies the loss.
        eps: >= 0, added to the variance before the square root.
        gather: every process's rows. The statistics (mean, variance, C) are over the
            global batch, so every process computes the same full loss; the all-gather's
            backward sums each row's gradient over the processes and DDP then averages the
            parameters' gradients over them, which gives exactly the single-process gradient.
            The loss is not divided by the number of processes: the authors' all_reduce of C
            has no backward, so their gradient is 1/world_size of it (solo-learn's too).
    """
    if lambda_offdiag < 0:
        raise ValueError(f"lambda_offdiag must be >= 0, got {lambda_offdiag}")
    if scale <= 0:
        raise ValueError(f"scale must be > 0, got {scale}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(
            f"z1 and z2 must be (N, D) of one shape, got {tuple(z1.shape)}, {tuple(z2.shape)}"
        )
    with full_precision(z1):
        a, _ = gather(upcast(z1))  # (M, D)
        b, _ = gather(upcast(z2))
        m = a.shape[0]
        if m < 2:
            raise ValueError(f"Barlow Twins needs a global batch of >= 2 rows, got {m}")
        c = standardise(a, eps).T @ standardise(b, eps) / m  # (D, D)
        on_diagonal = (1 - c.diagonal()).pow(2).sum()
        return scale * (on_diagonal + lambda_offdiag * off_diagonal(c).pow(2).sum())


def standardise(x: Tensor, eps: float) -> Tensor:
    """(M, D) -> each column with mean 0 and (biased) variance var / (var + eps)."""
    mean = x.mean(dim=0)
    var = x.var(dim=0, unbiased=False)
    return (x - mean) / torch.sqrt(var + eps)


def off_diagonal(c: Tensor) -> Tensor:
    """The D*(D-1) off-diagonal entries of a (D, D) matrix, as a view (no copy)."""
    d = c.shape[0]
    return c.flatten()[:-1].view(d - 1, d + 1)[:, 1:]

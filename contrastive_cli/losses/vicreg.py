"""VICReg: variance, invariance and covariance regularisation (Bardes et al., 2022)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from contrastive_cli.distributed import Gather, local_only
from contrastive_cli.losses.barlow import off_diagonal
from contrastive_cli.losses.precision import full_precision, upcast


def vicreg_terms(
    z1: Tensor, z2: Tensor, gamma: float = 1.0, eps: float = 1e-4, gather: Gather = local_only
) -> tuple[Tensor, Tensor, Tensor]:
    """(invariance, variance, covariance), each over the M rows of the global batch:

        s(Z, Z') = mean_{n, d} (z_nd - z'_nd)^2                                  (MSE)
        v(Z)     = mean_d relu(gamma - sqrt(Var(z_.d) + eps))     (unbiased variance)
        c(Z)     = sum_{i != j} Cov(Z)_ij^2 / D,    Cov(Z) = (Z - mean)^T (Z - mean) / (M - 1)
        variance = (v(Z) + v(Z')) / 2,   covariance = c(Z) + c(Z')

    The paper's eq. 6 writes mu [v(Z) + v(Z')]; the authors' code (main_vicreg.py), which
    produced the paper's results with mu = 25, averages the two branches instead. We follow
    the code so that 25/25/1 mean what they meant; with the paper's literal sum, halve mu.

    Args:
        z1, z2: (N, D) local expander outputs of the two views (row n: one image).
        gamma: > 0, the target standard deviation of each dimension.
        eps: > 0, keeps the square root's gradient finite at zero variance.
        gather: every process's rows; every process computes the same full loss from the
            global batch (the invariance term too, which is per-sample and so equal to the
            authors' local MSE averaged over processes). The all-gather's backward sums the
            gradient over processes and DDP averages it: the single-process gradient, not
            1/world_size of it.
    """
    if gamma <= 0:
        raise ValueError(f"gamma must be > 0, got {gamma}")
    if eps <= 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(
            f"z1 and z2 must be (N, D) of one shape, got {tuple(z1.shape)}, {tuple(z2.shape)}"
        )
    with full_precision(z1):
        a, _ = gather(upcast(z1))  # (M, D)
        b, _ = gather(upcast(z2))
        if a.shape[0] < 2:
            raise ValueError(f"VICReg needs a global batch of >= 2 rows, got {a.shape[0]}")
        invariance = F.mse_loss(a, b)
        variance = (_variance(a, gamma, eps) + _variance(b, gamma, eps)) / 2
        covariance = _covariance(a) + _covariance(b)
        return invariance, variance, covariance


def vicreg_loss(
    z1: Tensor,
    z2: Tensor,
    sim_coeff: float = 25.0,
    std_coeff: float = 25.0,
    cov_coeff: float = 1.0,
    gamma: float = 1.0,
    eps: float = 1e-4,
    gather: Gather = local_only,
) -> Tensor:
    """lambda s + mu (v(Z) + v(Z')) / 2 + nu (c(Z) + c(Z')), see ``vicreg_terms``.

    Defaults are the paper's: lambda = mu = 25, nu = 1, gamma = 1, eps = 1e-4.
    """
    for name, value in (
        ("sim_coeff", sim_coeff),
        ("std_coeff", std_coeff),
        ("cov_coeff", cov_coeff),
    ):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    invariance, variance, covariance = vicreg_terms(z1, z2, gamma, eps, gather)
    return sim_coeff * invariance + std_coeff * variance + cov_coeff * covariance


def _variance(x: Tensor, gamma: float, eps: float) -> Tensor:
    return F.relu(gamma - torch.sqrt(x.var(dim=0) + eps)).mean()


def _covariance(x: Tensor) -> Tensor:
    m, d = x.shape
    x = x - x.mean(dim=0)
    cov = x.T @ x / (m - 1)  # (D, D)
    return off_diagonal(cov).pow(2).sum() / d

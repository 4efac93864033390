"""Barlow Twins against loops over samples and dimensions, closed forms of eq. 1, and the
multi-process contract (global statistics, undivided gradient)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from contrastive_cli.losses import barlow_twins_loss
from tests.losscheck import assert_close, assert_matches, assert_ranks_equal_whole, randn


def naive_barlow(z1: Tensor, z2: Tensor, lam: float, scale: float, eps: float) -> Tensor:
    """Eq. 1 written out: standardise each dimension over the batch (biased variance, as
    BatchNorm), C_ij = sum_n z1_ni z2_nj / M, then the two sums."""
    m, d = z1.shape

    def standardised(z: Tensor) -> list[list[Tensor]]:
        columns = []
        for j in range(d):
            mean = sum(z[n, j] for n in range(m)) / m
            var = sum((z[n, j] - mean) ** 2 for n in range(m)) / m
            columns.append([(z[n, j] - mean) / torch.sqrt(var + eps) for n in range(m)])
        return columns

    a, b = standardised(z1), standardised(z2)
    loss = z1.new_zeros(())
    for i in range(d):
        for j in range(d):
            c_ij = sum(a[i][n] * b[j][n] for n in range(m)) / m
            loss = loss + ((1 - c_ij) ** 2 if i == j else lam * c_ij**2)
    return scale * loss


@pytest.mark.parametrize("m,d", [(2, 1), (5, 3), (12, 6)])
@pytest.mark.parametrize("lam,scale,eps", [(0.0051, 1.0, 1e-5), (0.5, 0.1, 1e-3), (0.0, 2.0, 0.0)])
def test_barlow_equals_naive_value_and_gradients(m, d, lam, scale, eps):
    z1, z2 = randn(m, d, seed=m), randn(m, d, seed=10 * d + 1)
    assert_matches(
        lambda a, b: barlow_twins_loss(a, b, lam, scale, eps),
        lambda a, b: naive_barlow(a, b, lam, scale, eps),
        z1,
        z2,
    )


def hadamard_columns(m: int, d: int) -> Tensor:
    """d columns of a Sylvester Hadamard matrix of order m, skipping the all-ones one: each
    column has mean 0, variance 1 and is orthogonal to the others, so C = I on identical views."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < m:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h[:, 1 : d + 1]


@pytest.mark.parametrize("eps", [0.0, 1e-5, 0.3])
def test_barlow_identical_decorrelated_views(eps):
    """Standardised identical views with orthogonal columns: C = I / (1 + eps) (the variance
    is 1), so the loss is D (eps / (1 + eps))^2: 0 with eps = 0."""
    z = hadamard_columns(8, 5)
    expected = 5 * (eps / (1 + eps)) ** 2
    assert_close(barlow_twins_loss(z, z.clone(), eps=eps), expected, abs_=1e-15)
    # Any per-dimension affine change of a view is standardised away.
    shifted = z * torch.tensor([3.0, 0.5, 2.0, 1.0, 9.0], dtype=torch.float64) + 4.0
    assert_close(barlow_twins_loss(shifted, z, eps=0.0), 0.0, abs_=1e-12)


def test_barlow_opposite_views_and_collapse():
    z = hadamard_columns(8, 4)
    assert_close(barlow_twins_loss(z, -z, eps=0.0), 4 * 4.0)  # C = -I: (1 - (-1))^2 per dim
    collapsed = torch.ones(8, 4, dtype=torch.float64) * randn(1, 4, seed=0)
    assert_close(barlow_twins_loss(collapsed, collapsed), 4.0)  # C = 0: 1 per dimension


def test_barlow_off_diagonal_terms_are_weighted_by_lambda():
    """Two identical dimensions: C = [[1, 1], [1, 1]] (eps 0), so the loss is 2 lambda."""
    column = hadamard_columns(4, 1)
    z = torch.cat([column, column], 1)
    for lam in (0.0, 0.0051, 1.0):
        assert_close(barlow_twins_loss(z, z, lam, eps=0.0), 2 * lam, abs_=1e-15)
    assert_close(barlow_twins_loss(z, z, 1.0, scale=0.25, eps=0.0), 0.5)


@pytest.mark.parametrize("world", [2, 3])
def test_barlow_ranks_equal_the_whole_batch_with_the_undivided_gradient(world):
    z1, z2 = randn(6 * world, 5, seed=world), randn(6 * world, 5, seed=world + 7)
    loss = lambda gather, a, b: barlow_twins_loss(a, b, 0.1, gather=gather)  # noqa: E731
    assert_ranks_equal_whole(loss, world, z1, z2)
    # The per-process batches' statistics would give another loss.
    local = barlow_twins_loss(z1[:6], z2[:6], 0.1).item()
    assert local != pytest.approx(barlow_twins_loss(z1, z2, 0.1).item(), rel=1e-3)


def test_barlow_rejects_bad_hyperparameters_and_inputs():
    z = randn(4, 3, seed=0)
    for kwargs, name in [
        ({"lambda_offdiag": -1.0}, "lambda"),
        ({"scale": 0.0}, "scale"),
        ({"eps": -1e-5}, "eps"),
    ]:
        with pytest.raises(ValueError, match=name):
            barlow_twins_loss(z, z, **kwargs)
    with pytest.raises(ValueError, match=">= 2 rows"):
        barlow_twins_loss(z[:1], z[:1])
    with pytest.raises(ValueError, match="one shape"):
        barlow_twins_loss(z, z[:, :2])
    assert math.isfinite(barlow_twins_loss(z, z).item())

"""VICReg against loops over samples and dimensions, its terms' closed forms, and the
multi-process contract (global statistics, undivided gradient)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from contrastive_cli.losses import vicreg_loss, vicreg_terms
from tests.losscheck import assert_close, assert_matches, assert_ranks_equal_whole, randn


def naive_terms(z1: Tensor, z2: Tensor, gamma: float, eps: float) -> tuple[Tensor, Tensor, Tensor]:
    """Eqs. 1-5 written out, with the authors' averaging of the two variance terms."""
    m, d = z1.shape
    invariance = sum((z1[n, j] - z2[n, j]) ** 2 for n in range(m) for j in range(d)) / (m * d)

    def v(z: Tensor) -> Tensor:
        total = z.new_zeros(())
        for j in range(d):
            mean = sum(z[n, j] for n in range(m)) / m
            var = sum((z[n, j] - mean) ** 2 for n in range(m)) / (m - 1)
            total = total + torch.relu(gamma - torch.sqrt(var + eps))
        return total / d

    def c(z: Tensor) -> Tensor:
        means = [sum(z[n, j] for n in range(m)) / m for j in range(d)]
        total = z.new_zeros(())
        for i in range(d):
            for j in range(d):
                if i != j:
                    cov = sum((z[n, i] - means[i]) * (z[n, j] - means[j]) for n in range(m))
                    total = total + (cov / (m - 1)) ** 2
        return total / d

    return invariance, (v(z1) + v(z2)) / 2, c(z1) + c(z2)


def naive_vicreg(z1, z2, coeffs, gamma, eps) -> Tensor:
    s, v, c = naive_terms(z1, z2, gamma, eps)
    return coeffs[0] * s + coeffs[1] * v + coeffs[2] * c


@pytest.mark.parametrize("m,d", [(2, 1), (5, 3), (10, 6)])
@pytest.mark.parametrize(
    "coeffs,gamma,eps", [((25.0, 25.0, 1.0), 1.0, 1e-4), ((1.0, 3.0, 0.5), 2.0, 1e-2)]
)
@pytest.mark.parametrize("spread", [0.3, 3.0])  # below and above gamma: the hinge on and off
def test_vicreg_equals_naive_value_and_gradients(m, d, coeffs, gamma, eps, spread):
    z1, z2 = spread * randn(m, d, seed=m + d), spread * randn(m, d, seed=3 * m)
    assert_matches(
        lambda a, b: vicreg_loss(a, b, *coeffs, gamma=gamma, eps=eps),
        lambda a, b: naive_vicreg(a, b, coeffs, gamma, eps),
        z1,
        z2,
    )
    for term, expected in zip(
        vicreg_terms(z1, z2, gamma, eps), naive_terms(z1, z2, gamma, eps), strict=True
    ):
        assert_close(term, expected)


@pytest.mark.parametrize("gamma,eps", [(1.0, 1e-4), (2.0, 0.01)])
def test_vicreg_collapse_costs_gamma_minus_sqrt_eps_per_dimension(gamma, eps):
    """All embeddings equal: variance 0, so each dimension's hinge is gamma - sqrt(eps);
    covariance 0, invariance 0 for identical views."""
    z = torch.ones(6, 4, dtype=torch.float64) * randn(1, 4, seed=0)
    s, v, c = vicreg_terms(z, z.clone(), gamma, eps)
    assert_close(s, 0.0)
    assert_close(c, 0.0)
    assert_close(v, gamma - math.sqrt(eps))
    assert_close(vicreg_loss(z, z.clone(), gamma=gamma, eps=eps), 25 * (gamma - math.sqrt(eps)))


def test_vicreg_identical_decorrelated_spread_out_views_cost_nothing():
    """±1 orthogonal columns (Hadamard): unbiased variance M/(M-1) > 1, covariance 0."""
    h = torch.tensor([[1, 1, 1, 1], [1, -1, 1, -1], [1, 1, -1, -1], [1, -1, -1, 1]])
    z = h[:, 1:].to(torch.float64)
    assert_close(vicreg_loss(z, z.clone()), 0.0)


def test_vicreg_terms_closed_forms():
    z = randn(7, 3, seed=1)
    s, v, c = vicreg_terms(z, z + 0.5)  # a constant shift: MSE 0.25, statistics unchanged
    _, v0, c0 = vicreg_terms(z, z)
    assert_close(s, 0.25)
    assert_close(v, v0)
    assert_close(c, c0)
    # Two copies of one column: off-diagonal covariance = its variance, twice, over D = 2.
    column = randn(9, 1, seed=2)
    twin = torch.cat([column, column], 1)
    var = column.var().item()
    assert_close(vicreg_terms(twin, twin)[2], 2 * (2 * var**2) / 2)


@pytest.mark.parametrize("world", [2, 4])
def test_vicreg_ranks_equal_the_whole_batch_with_the_undivided_gradient(world):
    z1, z2 = randn(3 * world, 4, seed=world), 0.5 * randn(3 * world, 4, seed=world + 1)
    assert_ranks_equal_whole(lambda g, a, b: vicreg_loss(a, b, gather=g), world, z1, z2)
    local = vicreg_loss(z1[:3], z2[:3]).item()
    assert local != pytest.approx(vicreg_loss(z1, z2).item(), rel=1e-3)


def test_vicreg_rejects_bad_hyperparameters_and_inputs():
    z = randn(4, 3, seed=0)
    for kwargs, name in [
        ({"sim_coeff": -1.0}, "sim_coeff"),
        ({"std_coeff": -1.0}, "std_coeff"),
        ({"cov_coeff": -1.0}, "cov_coeff"),
        ({"gamma": 0.0}, "gamma"),
        ({"eps": 0.0}, "eps"),
    ]:
        with pytest.raises(ValueError, match=name):
            vicreg_loss(z, z, **kwargs)
    with pytest.raises(ValueError, match=">= 2 rows"):
        vicreg_loss(z[:1], z[:1])
    with pytest.raises(ValueError, match="one shape"):
        vicreg_loss(z, z[:2])

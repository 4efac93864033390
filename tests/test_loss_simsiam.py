"""SimSiam's D(p, z) against a loop over samples and dimensions, closed forms, stop-gradient."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from contrastive_cli.losses import simsiam_loss
from tests.losscheck import assert_close, assert_matches, randn


def naive_simsiam(p: Tensor, z: Tensor) -> Tensor:
    """SimSiam eq. 1: -p/|p| . z/|z|, averaged over the batch; z is a constant (eq. 3)."""
    z = z.detach()
    total = p.new_zeros(())
    for n in range(p.shape[0]):
        dot = sum(p[n, d] * z[n, d] for d in range(p.shape[1]))
        p_norm = torch.sqrt(sum(p[n, d] ** 2 for d in range(p.shape[1])))
        z_norm = math.sqrt(sum(float(z[n, d]) ** 2 for d in range(p.shape[1])))
        total = total - dot / (p_norm * z_norm)
    return total / p.shape[0]


@pytest.mark.parametrize("n,d", [(1, 2), (4, 3), (9, 16)])
def test_simsiam_equals_naive_value_and_gradient(n, d):
    p, z = randn(n, d, seed=n), randn(n, d, seed=100 + d)
    assert_matches(lambda p_: simsiam_loss(p_, z), lambda p_: naive_simsiam(p_, z), p)


def test_simsiam_closed_forms():
    p = randn(8, 5, seed=0)
    assert simsiam_loss(p, p.clone()).item() == pytest.approx(-1.0, abs=1e-12)  # identical
    assert simsiam_loss(p, 7.0 * p).item() == pytest.approx(-1.0, abs=1e-12)  # scale-free
    assert simsiam_loss(p, -p).item() == pytest.approx(1.0, abs=1e-12)  # opposite
    e = torch.eye(4, dtype=torch.float64)
    assert simsiam_loss(e, e.roll(1, dims=1)).item() == pytest.approx(0.0, abs=1e-12)


def test_simsiam_sends_no_gradient_to_the_target():
    p, z = randn(4, 5, seed=0).requires_grad_(True), randn(4, 5, seed=1).requires_grad_(True)
    simsiam_loss(p, z).backward()
    assert p.grad is not None and p.grad.abs().sum() > 0 and z.grad is None


def test_simsiam_symmetric_objective_of_the_paper():
    """0.5 D(p1, z2) + 0.5 D(p2, z1) of identical views is -1, its minimum."""
    p1, z1 = randn(6, 4, seed=2), randn(6, 4, seed=3)
    loss = 0.5 * simsiam_loss(p1, z1) + 0.5 * simsiam_loss(z1, p1)
    assert -1 <= loss.item() <= 1
    assert_close(0.5 * simsiam_loss(z1, z1) + 0.5 * simsiam_loss(z1, z1), -1.0)


def test_simsiam_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="one shape"):
        simsiam_loss(randn(4, 3, seed=0), randn(4, 2, seed=1))

"""MoCo v3: the loss against the paper's pseudo-code written with loops, the multi-process
contract, and the method's momentum encoder and its cosine schedule."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
from torch import Tensor

from contrastive_cli.losses import mocov3_loss
from contrastive_cli.methods.mocov3 import MoCoV3
from contrastive_cli.models.heads import mlp_head
from tests.fakes import Flat, on_replicas, rank_blocks, views
from tests.losscheck import assert_close, assert_matches, assert_ranks_equal_whole, randn, unit


def naive_ctr(q: Tensor, k: Tensor, t: float) -> Tensor:
    """Algorithm 1's ctr: CrossEntropyLoss(q k^T / T, range(N)) * 2T, unit rows."""
    k = k.detach()
    total = 0
    for n in range(q.shape[0]):
        logits = [unit(q[n]) @ unit(k[m]) / t for m in range(k.shape[0])]
        total = total - (logits[n] - torch.log(sum(torch.exp(x) for x in logits)))
    return 2 * t * total / q.shape[0]


def naive_mocov3(q1, q2, k1, k2, t):
    return naive_ctr(q1, k2, t) + naive_ctr(q2, k1, t)


@pytest.mark.parametrize("n,d", [(1, 3), (4, 6), (9, 5)])
@pytest.mark.parametrize("t", [0.2, 1.0])
def test_mocov3_loss_equals_the_papers_pseudocode_value_and_gradients(n, d, t):
    q1, q2, k1, k2 = (randn(n, d, seed=s) for s in range(4))
    assert_matches(
        lambda a, b: mocov3_loss(a, b, k1, k2, t),
        lambda a, b: naive_mocov3(a, b, k1, k2, t),
        q1,
        q2,
    )


def test_mocov3_keys_take_no_gradient():
    q1, q2, k1, k2 = (randn(4, 3, seed=s).requires_grad_() for s in range(4))
    mocov3_loss(q1, q2, k1, k2).backward()
    assert k1.grad is None and k2.grad is None and q1.grad is not None


def test_mocov3_aligned_orthogonal_pairs_closed_form():
    """q_n = k_n, rows orthogonal: each ctr is 2T * -log(e^{1/T} / (e^{1/T} + N - 1))."""
    n, t = 5, 0.2
    e = torch.eye(n, dtype=torch.float64)
    ctr = -2 * t * math.log(math.exp(1 / t) / (math.exp(1 / t) + n - 1))
    assert_close(mocov3_loss(e, e, e, e, t), 2 * ctr)


@pytest.mark.parametrize("world", [2, 3])
def test_mocov3_ranks_give_the_whole_batchs_loss_and_gradient(world):
    inputs = [randn(6, 4, seed=s) for s in range(4)]
    assert_ranks_equal_whole(lambda g, a, b, c, d: mocov3_loss(a, b, c, d, 0.2, g), world, *inputs)


def test_mocov3_loss_computes_in_float32_under_bf16_autocast():
    q1, q2, k1, k2 = (randn(8, 16, seed=s).bfloat16() for s in range(4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = mocov3_loss(q1, q2, k1, k2, 0.2)
    assert value.dtype == torch.float32
    expected = naive_mocov3(*(x.double() for x in (q1, q2, k1, k2)), 0.2)
    assert math.isclose(value.item(), expected.item(), rel_tol=1e-5)


# --------------------------------------------------------------------------- the method
def make(**kwargs) -> MoCoV3:
    torch.manual_seed(0)
    head = partial(mlp_head, hidden_dim=8, out_dim=4, batch_norm=False)
    return MoCoV3(Flat(), head, head, projection_dim=4, **kwargs)


def test_mocov3_step_is_its_loss_and_trains_only_the_base_networks():
    method = make()
    with torch.no_grad():  # move the momentum copy away from the base, so keys differ
        for p in method.momentum_encoder.parameters():
            p.add_(0.1)
    v1, v2 = views(5)
    loss = method([v1, v2])
    q1, q2 = (method.predictor(method.projector(method.encoder(v))) for v in (v1, v2))
    k1, k2 = (method.momentum_projector(method.momentum_encoder(v)) for v in (v1, v2))
    assert_close(loss.detach(), mocov3_loss(q1, q2, k1, k2, 0.2).detach(), rel=1e-6)
    loss.backward()
    for name, p in method.named_parameters():
        if name.startswith("momentum_"):
            assert not p.requires_grad and p.grad is None, name
        else:
            assert p.grad is not None, name


@pytest.mark.parametrize("step,total", [(1, 100), (50, 100), (100, 100)])
def test_mocov3_momentum_follows_the_cosine_from_base_to_one(step, total):
    method = make(base_momentum=0.99)
    with torch.no_grad():
        for p in method.encoder.parameters():
            p.add_(1.0)
    before = [p.clone() for p in method.momentum_encoder.parameters()]
    method.after_step(step, total)
    m = 1 - 0.01 * (math.cos(math.pi * step / total) + 1) / 2
    for b, t, o in zip(
        before, method.momentum_encoder.parameters(), method.encoder.parameters(), strict=True
    ):
        torch.testing.assert_close(t, m * b + (1 - m) * o)
    if step == total:
        assert all(
            torch.equal(b, t)
            for b, t in zip(before, method.momentum_encoder.parameters(), strict=True)
        )


def test_mocov3_mean_over_ranks_equals_the_whole_batch():
    method = make()
    world, n = 2, 4
    v1, v2 = views(world * n, seed=4)
    losses = on_replicas(method, rank_blocks(world, v1, v2), lambda m, a, b: m([a, b]).item())
    assert sum(losses) / world == pytest.approx(method([v1, v2]).item(), rel=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"temperature": 0.0}, "temperature"), ({"base_momentum": 1.5}, "base_momentum")],
)
def test_mocov3_refuses_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make(**kwargs)

"""NNCLR: the loss against the paper's pseudo-code written with loops, the nearest neighbours,
the multi-process contract, and what the method's queue (support set) holds."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from contrastive_cli.losses import nearest_neighbours, nnclr_loss
from contrastive_cli.methods.nnclr import NNCLR
from contrastive_cli.models.heads import mlp_head
from tests.fakes import Flat, on_replicas, rank_blocks, views
from tests.losscheck import assert_close, assert_matches, assert_ranks_equal_whole, randn, unit


def naive_nn(z: Tensor, support: Tensor) -> list[Tensor]:
    """The support row of largest cosine similarity, normalised, for each row of z."""
    out = []
    for row in z:
        sims = [float(unit(row.detach()) @ unit(s)) for s in support]
        out.append(unit(support[max(range(len(sims)), key=sims.__getitem__)]).detach())
    return out


def naive_l(nn_rows: list[Tensor], p: Tensor, t: float) -> Tensor:
    """Algorithm 1's L(nn, p): cross-entropy of logits nn_i . p_k / T, label i, mean over i."""
    total = 0
    for i, a in enumerate(nn_rows):
        logits = [a @ unit(p[k]) / t for k in range(p.shape[0])]
        total = total - (logits[i] - torch.log(sum(torch.exp(x) for x in logits)))
    return total / len(nn_rows)


def naive_nnclr(z1, z2, p1, p2, support, t):
    return naive_l(naive_nn(z1, support), p2, t) / 2 + naive_l(naive_nn(z2, support), p1, t) / 2


@pytest.mark.parametrize("n,d,q", [(1, 3, 5), (4, 6, 9), (8, 5, 32)])
@pytest.mark.parametrize("t", [0.1, 0.5])
def test_nnclr_loss_equals_the_papers_pseudocode_value_and_gradients(n, d, q, t):
    z1, z2, p1, p2 = (randn(n, d, seed=s) for s in range(4))
    support = randn(q, d, seed=9)
    assert_matches(
        lambda a, b, c, e: nnclr_loss(a, b, c, e, support, t),
        lambda a, b, c, e: naive_nnclr(a, b, c, e, support, t),
        z1,
        z2,
        p1,
        p2,
    )


def test_nearest_neighbours_are_the_most_similar_unit_support_rows():
    support = torch.tensor([[3.0, 0.0], [0.0, 2.0], [-1.0, -1.0]], dtype=torch.float64)
    z = torch.tensor([[5.0, 1.0], [0.1, 1.0], [-2.0, -3.0]], dtype=torch.float64)
    expected = F.normalize(support, dim=1)
    assert torch.equal(nearest_neighbours(z, support), expected)
    assert torch.equal(nearest_neighbours(z * 7, support * 0.1), expected)  # norms: irrelevant


def test_no_gradient_reaches_the_projections_or_the_support_set():
    z1, z2, p1, p2, support = (randn(4, 3, seed=s).requires_grad_() for s in range(5))
    nnclr_loss(z1, z2, p1, p2, support).backward()
    assert z1.grad is None and z2.grad is None and support.grad is None
    assert p1.grad is not None and p2.grad is not None


def test_support_set_holding_the_other_views_aligned_orthogonal_pairs_closed_form():
    """Support = the images' unit embeddings, predictions equal to them, rows orthogonal:
    each NN is the image itself; the positive logit is 1/T, N-1 negatives 0."""
    n, t = 4, 0.2
    e = torch.eye(n, dtype=torch.float64)
    expected = -math.log(math.exp(1 / t) / (math.exp(1 / t) + n - 1))
    assert_close(nnclr_loss(e, e, e, e, e, t), expected)


@pytest.mark.parametrize("world", [2, 4])
def test_nnclr_ranks_give_the_whole_batchs_loss_and_gradient(world):
    support = randn(16, 5, seed=7)
    inputs = [randn(8, 5, seed=s) for s in range(4)]

    def loss(gather, a, b, c, e):
        return nnclr_loss(a, b, c, e, support, 0.1, gather)

    assert_ranks_equal_whole(loss, world, *inputs)


def test_nnclr_loss_computes_in_float32_under_bf16_autocast():
    z1, z2, p1, p2 = (randn(8, 16, seed=s).bfloat16() for s in range(4))
    support = randn(32, 16, seed=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = nnclr_loss(z1, z2, p1, p2, support, 0.1)
    expected = naive_nnclr(*(x.double() for x in (z1, z2, p1, p2)), support, 0.1)
    assert value.dtype == torch.float32
    assert math.isclose(value.item(), expected.item(), rel_tol=1e-5)


@pytest.mark.parametrize("t", [0.0, -0.1])
def test_nnclr_rejects_non_positive_temperature(t):
    with pytest.raises(ValueError, match="temperature"):
        nnclr_loss(*(randn(2, 3, seed=s) for s in range(5)), temperature=t)


# --------------------------------------------------------------------------- the method
def make(queue_size: int = 16) -> NNCLR:
    torch.manual_seed(0)
    head = partial(mlp_head, hidden_dim=8, out_dim=4, batch_norm=False)
    return NNCLR(Flat(), head, head, projection_dim=4, queue_size=queue_size)


def test_nnclr_step_is_the_loss_of_its_projections_predictions_and_queue():
    method = make()
    v1, v2 = views(5)
    queue = method.queue.keys.clone()
    loss = method([v1, v2])
    z1, z2 = method.projector(method.encoder(v1)), method.projector(method.encoder(v2))
    p1, p2 = method.predictor(z1), method.predictor(z2)
    assert_close(loss.detach(), nnclr_loss(z1, z2, p1, p2, queue, 0.1).detach(), rel=1e-6)
    loss.backward()
    assert all(
        p.grad is not None for m in (method.encoder, method.projector) for p in m.parameters()
    )


def test_nnclr_enqueues_the_first_views_projections_after_the_step():
    method = make(queue_size=16)
    v1, v2 = views(5)
    before = method.queue.keys.clone()
    method([v1, v2])
    assert torch.equal(method.queue.keys, before)  # the step reads the queue, changes nothing
    method.after_step(1, 10)
    with torch.no_grad():
        z1 = F.normalize(method.projector(method.encoder(v1)), dim=1)
    assert torch.allclose(method.queue.keys[:5], z1, atol=1e-6)
    assert torch.equal(method.queue.keys[5:], before[5:])
    assert int(method.queue.ptr) == 5


def test_nnclr_queue_takes_every_ranks_projections_in_rank_order():
    method = make(queue_size=16)
    world, n = 2, 3
    v1, v2 = views(world * n, seed=3)

    def step(replica: NNCLR, a: Tensor, b: Tensor) -> Tensor:
        replica([a, b])
        replica.after_step(1, 10)
        return replica.queue.keys

    queues = on_replicas(method, rank_blocks(world, v1, v2), step)
    method([v1, v2])
    method.after_step(1, 10)
    for queue in queues:
        assert torch.allclose(queue, method.queue.keys, atol=1e-6)


def test_nnclr_mean_over_ranks_equals_the_whole_batch():
    method = make()
    world, n = 2, 4
    v1, v2 = views(world * n, seed=4)
    losses = on_replicas(method, rank_blocks(world, v1, v2), lambda m, a, b: m([a, b]).item())
    assert sum(losses) / world == pytest.approx(method([v1, v2]).item(), rel=1e-6)


def test_nnclr_queue_is_in_the_checkpoint():
    method = make()
    method(views(5))
    method.after_step(1, 10)
    fresh = make()
    fresh.load_state_dict(method.state_dict())
    assert torch.equal(fresh.queue.keys, method.queue.keys)
    assert int(fresh.queue.ptr) == int(method.queue.ptr) == 5
    v = views(4, seed=8)
    assert fresh(v).item() == method(v).item()

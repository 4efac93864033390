"""SwAV: Sinkhorn-Knopp and the swapped prediction against the paper's pseudo-code written
with loops; no NaN under bf16 autocast; the codes over the global batch; the queue, the
frozen prototypes and the epoch clock of the method."""

from __future__ import annotations

import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from contrastive_cli.losses import sinkhorn, swav_loss
from contrastive_cli.methods.swav import SwAV
from contrastive_cli.models.encoders import ConvNet
from contrastive_cli.models.heads import mlp_head
from tests.fakes import Flat, on_replicas, rank_blocks
from tests.losscheck import assert_close, randn, value_and_grads


def naive_sinkhorn(scores: Tensor, eps: float, iters: int) -> Tensor:
    """The paper's Algorithm (appendix A.1) with loops: Q = exp(scores / eps)^T / sum; then
    rows scaled to r = 1/K, columns to c = 1/B, ``iters`` times; columns normalised to 1."""
    b, k = scores.shape
    q = [[math.exp(float(scores[j, i]) / eps) for j in range(b)] for i in range(k)]  # K x B
    total = sum(map(sum, q))
    q = [[x / total for x in row] for row in q]
    for _ in range(iters):
        for i in range(k):
            u = sum(q[i])
            q[i] = [x * (1 / k) / u for x in q[i]]
        for j in range(b):
            c = sum(q[i][j] for i in range(k))
            for i in range(k):
                q[i][j] *= (1 / b) / c
    out = [[q[i][j] / sum(q[r][j] for r in range(k)) for i in range(k)] for j in range(b)]
    return torch.tensor(out, dtype=torch.float64)


def naive_swav(scores: list[Tensor], codes: list[Tensor], t: float) -> Tensor:
    """The authors' loop: for each code crop i, mean over the other crops v of
    -mean_n sum_k q_i log softmax(s_v / T); then the mean over i."""
    total = 0
    for i, q in enumerate(codes):
        sub = 0
        others = [v for v in range(len(scores)) if v != i]
        for v in others:
            s = scores[v]
            for n in range(s.shape[0]):
                log_z = torch.log(sum(torch.exp(s[n, k] / t) for k in range(s.shape[1])))
                sub = (
                    sub
                    - sum(float(q[n, k]) * (s[n, k] / t - log_z) for k in range(s.shape[1]))
                    / s.shape[0]
                )
        total = total + sub / len(others)
    return total / len(codes)


@pytest.mark.parametrize("b,k", [(1, 3), (5, 4), (8, 12)])
@pytest.mark.parametrize("eps,iters", [(0.05, 3), (0.5, 1), (0.1, 10)])
def test_sinkhorn_equals_the_papers_pseudocode(b, k, eps, iters):
    scores = F.normalize(randn(b, k, seed=b + k), dim=1)  # cosines, as the method's
    assert_close(sinkhorn(scores, eps, iters), naive_sinkhorn(scores, eps, iters))


def test_sinkhorn_codes_are_distributions_that_share_the_prototypes_out():
    scores = F.normalize(randn(64, 8, seed=0), dim=1)
    q = sinkhorn(scores, 0.05, 50)
    assert_close(q.sum(dim=1), torch.ones(64))
    assert_close(q.sum(dim=0), torch.full((8,), 64 / 8), rel=1e-3)  # equipartition, nearly


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_sinkhorn_of_half_precision_scores_is_finite_float32(dtype, scale):
    """exp(1 / 0.05) overflows float16, and unnormalised scores (scale 30: exp(600))
    overflow float32: the maximum is subtracted and the work is in float32."""
    scores = (F.normalize(randn(32, 16, seed=1), dim=1) * scale).to(dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q = sinkhorn(scores)
    assert q.dtype == torch.float32 and torch.isfinite(q).all()
    if scale == 1.0:
        torch.testing.assert_close(
            q.double(), naive_sinkhorn(scores.double(), 0.05, 3), rtol=1e-4, atol=1e-6
        )


@pytest.mark.parametrize("n,k", [(1, 3), (4, 5)])
@pytest.mark.parametrize("crops", [(2, 2), (2, 4), (1, 3)])  # (code crops, crops)
@pytest.mark.parametrize("t", [0.1, 0.5])
def test_swav_loss_equals_the_authors_loop_value_and_gradients(n, k, crops, t):
    g, v = crops
    codes = [F.softmax(randn(n, k, seed=10 + i), dim=1) for i in range(g)]
    scores = [randn(n, k, seed=20 + i) for i in range(v)]
    value, grads = value_and_grads(lambda *s: swav_loss(list(s), codes, t), *scores)
    expected, expected_grads = value_and_grads(lambda *s: naive_swav(list(s), codes, t), *scores)
    assert_close(value, expected)
    for a, b in zip(grads, expected_grads, strict=True):
        assert_close(a, b)


def test_swav_loss_uniform_scores_is_log_k():
    k = 6
    codes = [F.softmax(randn(3, k, seed=i), dim=1) for i in range(2)]
    assert_close(swav_loss([torch.zeros(3, k, dtype=torch.float64)] * 4, codes), math.log(k))


def test_swav_loss_sends_no_gradient_to_the_codes():
    codes = [randn(3, 4, seed=i).softmax(dim=1).requires_grad_() for i in range(2)]
    scores = [randn(3, 4, seed=5 + i).requires_grad_() for i in range(2)]
    swav_loss(scores, codes).backward()
    assert all(c.grad is None for c in codes) and all(s.grad is not None for s in scores)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: sinkhorn(torch.zeros(2, 3), epsilon=0), "epsilon"),
        (lambda: sinkhorn(torch.zeros(2, 3), iterations=0), "iterations"),
        (lambda: swav_loss([torch.zeros(2, 3)] * 2, [torch.zeros(2, 3)], 0), "temperature"),
        (lambda: swav_loss([torch.zeros(2, 3)], [torch.zeros(2, 3)]), "crops"),
    ],
)
def test_bad_settings_are_refused(call, match):
    with pytest.raises(ValueError, match=match):
        call()


# --------------------------------------------------------------------------- the method
HEAD = partial(mlp_head, hidden_dim=8, out_dim=4, batch_norm=False)


def make(**kwargs) -> SwAV:
    torch.manual_seed(0)
    settings = dict(
        epochs=4, projection_dim=4, prototypes=5, queue_size=0, freeze_prototypes_epochs=0
    )
    return SwAV(Flat(), HEAD, **{**settings, **kwargs})


def crops(n: int, local: int = 0, seed: int = 0) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 3, 2, 2, generator=g) for _ in range(2 + local)]


def by_hand(method: SwAV, views: list[Tensor], queue: Tensor | None = None) -> Tensor:
    """The paper's step written out: unit embeddings, scores against unit prototypes,
    Sinkhorn codes of the two global crops (the queue's rows first), swapped prediction."""
    z = [F.normalize(method.projector(method.encoder(v)), dim=1) for v in views]
    c = F.normalize(method.prototypes.weight, dim=1)
    scores = [x @ c.T for x in z]
    codes = []
    for i in range(2):
        s = scores[i].detach()
        if queue is not None:
            s = torch.cat([queue[i] @ c.detach().T, s])
        codes.append(naive_sinkhorn(s.double(), 0.05, 3)[-views[0].shape[0] :].float())
    return swav_loss(scores, codes, 0.1)


@pytest.mark.parametrize("local", [0, 2])
def test_swav_step_is_the_papers_step(local):
    method = make()
    v = crops(6, local)
    assert_close(method(v).detach(), by_hand(method, v).detach(), rel=1e-5, abs_=1e-6)


@pytest.mark.parametrize("local", [0, 3])
def test_swav_step_under_bf16_autocast_is_finite_with_finite_gradients(local):
    """The mixed-precision trap: a small CNN under CPU bf16 autocast, the queue in use, the
    paper's eps and temperature, prototypes learning: loss and every gradient finite."""
    torch.manual_seed(0)
    encoder = ConvNet(1, 8, widths=(4, 8), strides=(2, 2))
    head = partial(mlp_head, hidden_dim=16, out_dim=8, batch_norm=True)
    method = SwAV(
        encoder,
        head,
        epochs=2,
        projection_dim=8,
        prototypes=300,
        queue_size=16,
        queue_start_epoch=0,
        freeze_prototypes_epochs=0,
    )
    g = torch.Generator().manual_seed(0)
    for step in range(1, 4):  # the queue fills at step 2 and is used at step 3
        views = [torch.rand(8, 1, 8, 8, generator=g) for _ in range(2)]
        views += [torch.rand(8, 1, 6, 6, generator=g) for _ in range(local)]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = method(views)
        method.zero_grad()
        loss.backward()
        assert loss.dtype == torch.float32 and torch.isfinite(loss)
        assert all(torch.isfinite(p.grad).all() for p in method.parameters() if p.grad is not None)
        assert method.prototypes.weight.grad.abs().sum() > 0
        method.after_step(step, 10)
    assert int(method.queue_rows[0]) == 16


def test_swav_prototypes_are_frozen_for_their_epochs_then_learn():
    method = make(epochs=4, freeze_prototypes_epochs=2)
    for step in range(1, 9):  # 8 steps over 4 epochs: 2 steps per epoch
        method.zero_grad()
        method(crops(4, seed=step)).backward()
        grad = method.prototypes.weight.grad
        assert grad is not None  # used: DDP needs every parameter to take part
        assert (grad.abs().sum() == 0) == (step <= 4), step  # epochs 0 and 1 frozen
        assert method.encoder.net[1].weight.grad.abs().sum() > 0
        method.after_step(step, 8)
    assert method.epoch() == 4


def test_swav_epoch_clock_sets_steps_per_epoch_once():
    method = make(epochs=4)
    assert method.epoch() == 0
    method(crops(4))
    method.after_step(1, 40)  # 10 steps per epoch
    assert method.clock.tolist() == [1, 10]
    method.after_step(10, 40)
    assert method.epoch() == 1
    method.after_step(11, 70)  # trainer.time_budget changed the epochs: per epoch stays 10
    assert method.clock.tolist() == [11, 10] and method.epoch() == 1


def test_swav_queue_fills_from_its_epoch_and_joins_sinkhorn_once_full():
    method = make(epochs=2, queue_size=8, queue_start_epoch=1)
    pushed = []
    for step in range(1, 6):  # 2 steps per epoch of 4 total: the queue starts at step 3
        v = crops(4, seed=step)
        if step == 5:  # full after steps 3 and 4: used, its rows before the batch's
            queue = method.queue.clone()
            assert_close(
                method(v).detach(), by_hand(method, v, queue).detach(), rel=1e-5, abs_=1e-6
            )
            assert torch.equal(queue[:, :4], pushed[0][:, :4]) and torch.equal(
                queue[:, 4:], pushed[1]
            )
            break
        assert_close(method(v).detach(), by_hand(method, v).detach(), rel=1e-5, abs_=1e-6)
        with torch.no_grad():
            z = torch.stack(
                [F.normalize(method.projector(method.encoder(x)), dim=1) for x in v[:2]]
            )
        method.after_step(step, 4)
        filled = int(method.queue_rows[0])
        assert filled == (0 if step < 3 else 4 * (step - 2)), step
        if step >= 3:
            pushed.append(z)
            assert torch.allclose(method.queue[:, 4 * (step - 3) : 4 * (step - 2)], z, atol=1e-6)


def test_swav_codes_are_of_the_global_batch_and_ranks_equal_the_whole():
    """Two processes' losses average to the whole batch's, and their queues after the step
    equal the whole batch's queue: Sinkhorn saw every process's rows."""
    method = make(queue_size=16, queue_start_epoch=0)
    world, n = 2, 4
    whole = crops(world * n, seed=3)

    def step(replica: SwAV, *v: Tensor) -> tuple[float, Tensor]:
        loss = replica(list(v)).item()
        replica.after_step(1, 10)
        return loss, replica.queue

    results = on_replicas(method, rank_blocks(world, *whole), step)
    expected = method(whole).item()
    method.after_step(1, 10)
    assert sum(r[0] for r in results) / world == pytest.approx(expected, rel=1e-6)
    for _, queue in results:
        assert torch.allclose(queue, method.queue, atol=1e-6)


def test_swav_state_in_a_checkpoint_resumes_the_same_epochs_and_queue():
    method = make(epochs=2, queue_size=8, queue_start_epoch=0, freeze_prototypes_epochs=1)
    for step in (1, 2, 3):
        method(crops(4, seed=step))
        method.after_step(step, 6)  # 3 steps per epoch
    fresh = make(epochs=2, queue_size=8, queue_start_epoch=0, freeze_prototypes_epochs=1)
    assert fresh.epoch() == 0  # reads (and caches) its own clock
    fresh.load_state_dict(method.state_dict())
    assert fresh.epoch() == method.epoch() == 1
    assert torch.equal(fresh.queue, method.queue) and fresh.queue_rows.tolist() == [8, 4]
    v = crops(4, seed=9)
    assert fresh(v).item() == method(v).item()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"temperature": 0.0}, "temperature"),
        ({"epsilon": -1.0}, "epsilon"),
        ({"epochs": 0}, "epochs"),
        ({"queue_size": -1}, "queue_size"),
        ({"freeze_prototypes_epochs": -1}, "freeze_prototypes_epochs"),
    ],
)
def test_swav_refuses_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make(**kwargs)

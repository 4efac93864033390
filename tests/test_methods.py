"""Methods: the MoCo queue, momentum updates and schedules, and what each method's step
computes and which parameters it trains."""

from __future__ import annotations

import copy
import itertools
import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from contrastive_cli.losses import moco_infonce, triplet_loss
from contrastive_cli.methods.byol import BYOL
from contrastive_cli.methods.moco import KeyQueue, MoCo
from contrastive_cli.methods.momentum import cosine_momentum, frozen_copy, update_momentum
from contrastive_cli.methods.simclr import SimCLR
from contrastive_cli.methods.triplet import Triplet
from contrastive_cli.models.encoders import ConvNet
from contrastive_cli.models.heads import mlp_head
from tests.fakes import run_ranks


class Flat(nn.Module):
    """A BatchNorm-free encoder, so a sample's features do not depend on its batch."""

    def __init__(self, in_dim: int = 12, out_dim: int = 6):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_dim, out_dim), nn.Tanh())
        self.out_dim = out_dim

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


HEAD = partial(mlp_head, hidden_dim=8, out_dim=4, batch_norm=False)


def views(n: int, seed: int = 0, shape: tuple[int, ...] = (3, 2, 2)) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g), torch.randn(n, *shape, generator=g)


def unit_keys(n: int, d: int = 3, seed: int = 0) -> Tensor:
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


def oldest_first(queue: KeyQueue) -> Tensor:
    """The queue's rows from oldest to newest: the next push overwrites row ``ptr`` first."""
    return queue.keys.roll(-int(queue.ptr), 0)


# --------------------------------------------------------------------------- KeyQueue
def same(a: Tensor, b: Tensor) -> bool:
    """Equal up to the rounding of re-normalising unit keys (the keys are distinct)."""
    return a.shape == b.shape and torch.allclose(a, b, atol=1e-6, rtol=0)


def test_queue_overwrites_the_oldest_rows_and_wraps_around():
    queue = KeyQueue(size=6, dim=3)
    k = unit_keys(8)
    queue.push(k[:4])
    assert same(queue.keys[:4], k[:4]) and int(queue.ptr) == 4
    queue.push(k[4:8])  # 4 does not divide 6: rows 4, 5, then 0, 1
    assert same(queue.keys[4:6], k[4:6])
    assert same(queue.keys[0:2], k[6:8])
    assert same(queue.keys[2:4], k[2:4])  # not yet overwritten
    assert int(queue.ptr) == 2
    assert same(oldest_first(queue), k[2:8])


@pytest.mark.parametrize("batch", [1, 2, 4, 5, 6, 7, 13])
def test_queue_holds_the_newest_keys_in_push_order(batch):
    size = 6
    queue = KeyQueue(size=size, dim=3)
    k = unit_keys(5 * batch + size, seed=batch)
    for start in range(0, len(k), batch):
        queue.push(k[start : start + batch])
    assert same(oldest_first(queue), k[-size:])


def test_queue_batch_larger_than_the_queue_keeps_its_newest_keys():
    queue = KeyQueue(size=4, dim=3)
    k = unit_keys(13)
    queue.push(k[:3])
    queue.push(k[3:13])  # 10 keys into 4 rows
    assert same(oldest_first(queue), k[9:13])
    queue.push(k[:1])  # FIFO continues: the oldest (k[9]) goes first
    assert same(oldest_first(queue), torch.cat([k[10:13], k[:1]]))


def test_queue_stores_normalised_keys_without_gradient():
    queue = KeyQueue(size=4, dim=3)
    raw = (torch.randn(2, 3) * 5).requires_grad_(True)
    queue.push(raw)
    assert torch.allclose(queue.keys[:2], F.normalize(raw.detach(), dim=1))
    assert not queue.keys.requires_grad
    assert {name for name, _ in queue.named_buffers()} == {"keys", "ptr"}  # saved in checkpoints


# --------------------------------------------------------------------------- MoCo
def make_moco(**kwargs) -> MoCo:
    torch.manual_seed(0)
    return MoCo(Flat(), HEAD, out_dim=4, **{"queue_size": 16, "temperature": 0.2, **kwargs})


def test_moco_loss_uses_the_queue_read_before_this_steps_keys():
    moco = make_moco()
    v1, v2 = views(5)
    before = moco.queue.keys.clone()
    loss = moco([v1, v2])
    assert torch.equal(moco.queue.keys, before)  # forward leaves the queue
    with torch.no_grad():
        q = moco.projector(moco.encoder(v1))
        k = moco.key_projector(moco.key_encoder(v2))
    assert loss.item() == pytest.approx(moco_infonce(q, k, before, 0.2).item(), rel=1e-6)

    ptr = int(moco.queue.ptr)
    moco.after_step(1, 10)  # the keys go in only now
    assert torch.allclose(moco.queue.keys[ptr : ptr + 5], F.normalize(k, dim=1), atol=1e-6)
    assert torch.equal(moco.queue.keys[ptr + 5 :], before[ptr + 5 :])
    # Non-vacuous: with this step's keys already in the queue the loss would differ.
    assert moco_infonce(q, k, moco.queue.keys, 0.2).item() != pytest.approx(loss.item(), rel=1e-4)


def test_moco_keys_carry_no_gradient():
    moco = make_moco()
    loss = moco(list(views(4)))
    assert moco._keys is not None and not moco._keys.requires_grad
    loss.backward()
    frozen = [*moco.key_encoder.parameters(), *moco.key_projector.parameters()]
    assert all(not p.requires_grad and p.grad is None for p in frozen)
    assert all(
        p.grad is not None for p in [*moco.encoder.parameters(), *moco.projector.parameters()]
    )


def test_moco_symmetric_averages_both_directions_and_enqueues_both_key_sets():
    moco = make_moco(symmetric=True)
    v1, v2 = views(3)
    before = moco.queue.keys.clone()
    loss = moco([v1, v2])
    with torch.no_grad():
        q1, q2 = moco.projector(moco.encoder(v1)), moco.projector(moco.encoder(v2))
        k1, k2 = moco.key_projector(moco.key_encoder(v1)), moco.key_projector(moco.key_encoder(v2))
    expected = (moco_infonce(q1, k2, before, 0.2) + moco_infonce(q2, k1, before, 0.2)) / 2
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    moco.after_step(1, 10)
    assert torch.allclose(moco.queue.keys[:6], F.normalize(torch.cat([k2, k1]), dim=1), atol=1e-6)
    assert int(moco.queue.ptr) == 6


def test_moco_keys_use_per_group_batchnorm_statistics():
    """Sample i's key is computed with BatchNorm statistics of the group i % splits."""
    torch.manual_seed(0)
    moco = MoCo(
        ConvNet(1, 8, widths=(4,), strides=(2,)), HEAD, out_dim=4, queue_size=8, key_bn_splits=2
    )
    v = views(6, shape=(1, 8, 8))[0]
    keys = moco._keys_of(v)
    with torch.no_grad():
        for i in range(2):
            group = moco.key_projector(moco.key_encoder(v[i::2]))
            assert torch.allclose(keys[i::2], group, atol=1e-6)


# --------------------------------------------------------------------------- momentum
@pytest.mark.parametrize("m", [0.0, 0.5, 0.99, 1.0])
def test_update_momentum_is_the_ema_formula(m):
    torch.manual_seed(0)
    online = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    target = frozen_copy(online)
    with torch.no_grad():
        for p in online.parameters():
            p.add_(torch.randn_like(p))
    online(torch.randn(8, 3))  # moves the BN running stats
    old = [p.clone() for p in target.parameters()]
    update_momentum(online, target, m)
    for p_t, p_old, p_o in zip(target.parameters(), old, online.parameters(), strict=True):
        assert torch.allclose(p_t, m * p_old + (1 - m) * p_o, atol=1e-7)
        assert not p_t.requires_grad
    for b_t, b_o in zip(target.buffers(), online.buffers(), strict=True):
        assert torch.equal(b_t, b_o)


def test_cosine_momentum_endpoints_and_midpoint():
    base = 0.996
    assert cosine_momentum(0, 1000, base) == pytest.approx(base)
    assert cosine_momentum(500, 1000, base) == pytest.approx((1 + base) / 2)
    assert cosine_momentum(1000, 1000, base) == pytest.approx(1.0)
    assert cosine_momentum(2000, 1000, base) == pytest.approx(1.0)  # clamped
    values = [cosine_momentum(s, 100, base) for s in range(101)]
    assert all(a <= b for a, b in itertools.pairwise(values))  # monotone


# --------------------------------------------------------------------------- BYOL
def make_byol() -> BYOL:
    torch.manual_seed(0)
    byol = BYOL(Flat(), HEAD, HEAD, projection_dim=4, base_momentum=0.9)
    with torch.no_grad():  # online != target
        for p in [*byol.encoder.parameters(), *byol.projector.parameters()]:
            p.add_(torch.randn_like(p))
    return byol


@pytest.mark.parametrize("step", [1, 51, 100])
def test_byol_after_step_moves_the_target_by_the_scheduled_amount(step):
    """Update k (1-based) uses tau = 1 - (1 - base)(cos(pi (k-1)/K) + 1)/2: base at the first."""
    byol, total = make_byol(), 100
    tau = 1 - (1 - 0.9) * (math.cos(math.pi * (step - 1) / total) + 1) / 2
    pairs = [(byol.encoder, byol.target_encoder), (byol.projector, byol.target_projector)]
    old = [[p.clone() for p in target.parameters()] for _, target in pairs]
    byol.after_step(step, total)
    for (online, target), before in zip(pairs, old, strict=True):
        for p_t, p_old, p_o in zip(target.parameters(), before, online.parameters(), strict=True):
            assert torch.allclose(p_t, tau * p_old + (1 - tau) * p_o, atol=1e-6)
    if step == 1:
        assert tau == pytest.approx(0.9)


def test_byol_loss_is_symmetric_in_the_views_and_the_target_gets_no_gradient():
    byol = make_byol()
    v1, v2 = views(4)
    loss = byol([v1, v2])
    assert loss.item() == pytest.approx(byol([v2, v1]).item(), rel=1e-6)
    loss.backward()
    assert all(
        p.grad is None
        for p in [*byol.target_encoder.parameters(), *byol.target_projector.parameters()]
    )


# --------------------------------------------------------------------------- Triplet
def test_triplet_positives_labels_uses_the_labels_as_ids():
    torch.manual_seed(0)
    method = Triplet(Flat(), HEAD, margin=0.3, mining="all", positives="labels")
    v1, v2 = views(6)
    labels = torch.tensor([0, 1, 0, 2, 1, 2])
    loss = method([v1, v2], labels)
    z = method.projector(method.encoder(torch.cat([v1, v2])))
    assert loss.item() == pytest.approx(
        triplet_loss(z, torch.cat([labels, labels]), 0.3, "all").item(), rel=1e-6
    )
    by_views = triplet_loss(z, torch.arange(6).repeat(2), 0.3, "all").item()
    assert loss.item() != pytest.approx(by_views, rel=1e-4)
    with pytest.raises(ValueError, match="labels"):
        method([v1, v2], None)


def test_triplet_positives_views_pairs_the_two_views_of_each_image():
    torch.manual_seed(0)
    method = Triplet(Flat(), HEAD, margin=0.3, mining="hard")
    v1, v2 = views(5)
    z = method.projector(method.encoder(torch.cat([v1, v2])))
    expected = triplet_loss(z, torch.arange(5).repeat(2), 0.3, "hard").item()
    assert method([v1, v2], torch.zeros(5, dtype=torch.long)).item() == pytest.approx(
        expected, rel=1e-6
    )


def test_triplet_rejects_unknown_positives():
    with pytest.raises(ValueError, match="positives"):
        Triplet(Flat(), HEAD, positives="classes")


# --------------------------------------------------------------------------- every method
def build(kind: str) -> nn.Module:
    torch.manual_seed(0)
    encoder = ConvNet(1, 8, widths=(4, 8), strides=(2, 2))
    head = partial(mlp_head, hidden_dim=16, out_dim=8, batch_norm=True)
    return {
        "simclr": lambda: SimCLR(encoder, head),
        "moco": lambda: MoCo(encoder, head, queue_size=32, out_dim=8),
        "byol": lambda: BYOL(encoder, head, head, projection_dim=8),
        "triplet": lambda: Triplet(encoder, head),
        "triplet_labels": lambda: Triplet(encoder, head, mining="hard", positives="labels"),
    }[kind]()


@pytest.mark.parametrize("kind", ["simclr", "moco", "byol", "triplet", "triplet_labels"])
def test_method_step_is_a_finite_scalar_that_trains_only_online_parameters(kind):
    method = build(kind)
    v1, v2 = views(8, shape=(1, 8, 8))
    loss = method([v1, v2], torch.tensor([0, 1, 2, 3, 0, 1, 2, 3]))
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    online = {n: p for n, p in method.named_parameters() if not n.startswith(("key_", "target_"))}
    momentum = {n: p for n, p in method.named_parameters() if n.startswith(("key_", "target_"))}
    assert all(p.grad is not None for p in online.values()), [
        n for n, p in online.items() if p.grad is None
    ]
    assert any(p.grad.abs().sum() > 0 for p in method.encoder.parameters())
    assert all(not p.requires_grad and p.grad is None for p in momentum.values())
    assert bool(momentum) == (kind in ("moco", "byol"))
    method.after_step(1, 10)  # the step's state update runs


# --------------------------------------------------------------------------- several processes
def rank_views(world: int, n: int) -> tuple[Tensor, Tensor, list[tuple[Tensor, Tensor]]]:
    v1, v2 = views(world * n, seed=3)
    return v1, v2, [(v1[r * n : (r + 1) * n], v2[r * n : (r + 1) * n]) for r in range(world)]


@pytest.mark.parametrize(
    "make",
    [
        lambda: SimCLR(Flat(), HEAD, temperature=0.3),
        lambda: Triplet(Flat(), HEAD, margin=0.5, mining="hard"),
        lambda: Triplet(Flat(), HEAD, margin=0.5, mining="semihard"),
        lambda: Triplet(Flat(), HEAD, margin=0.5, mining="all"),
    ],
    ids=["simclr", "triplet-hard", "triplet-semihard", "triplet-all"],
)
def test_method_mean_over_ranks_equals_the_whole_batch(make):
    """Each process sees its share of the images; the candidates come from all of them."""
    torch.manual_seed(0)
    method = make()
    world, n = 2, 4
    v1, v2, per_rank = rank_views(world, n)

    def step(gather, a: Tensor, b: Tensor) -> float:
        replica = copy.deepcopy(method)
        replica.gather = gather
        return replica([a, b]).item()

    losses = run_ranks(step, per_rank)
    assert sum(losses) / world == pytest.approx(method([v1, v2]).item(), rel=1e-6)


def test_moco_enqueues_the_keys_of_every_rank_in_rank_order():
    moco = make_moco()
    world, n = 2, 3
    _, _, per_rank = rank_views(world, n)

    def step(gather, a: Tensor, b: Tensor) -> Tensor:
        replica = copy.deepcopy(moco)
        replica.gather = gather
        replica([a, b])
        replica.after_step(1, 10)
        return replica.queue.keys

    queues = run_ranks(step, per_rank)
    with torch.no_grad():
        keys = torch.cat([moco.key_projector(moco.key_encoder(b)) for _, b in per_rank])
    for queue in queues:
        assert torch.allclose(queue[: world * n], F.normalize(keys, dim=1), atol=1e-6)

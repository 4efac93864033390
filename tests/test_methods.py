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

from contrastive_cli.losses import (
    barlow_twins_loss,
    contrastive_loss,
    dino_loss,
    moco_infonce,
    supcon_loss,
    triplet_loss,
    vicreg_loss,
)
from contrastive_cli.methods.barlow import BarlowTwins
from contrastive_cli.methods.byol import BYOL
from contrastive_cli.methods.contrastive import Contrastive
from contrastive_cli.methods.dino import DINO
from contrastive_cli.methods.moco import KeyQueue, MoCo
from contrastive_cli.methods.momentum import cosine_momentum, frozen_copy, update_momentum
from contrastive_cli.methods.simclr import SimCLR
from contrastive_cli.methods.simsiam import SimSiam
from contrastive_cli.methods.supcon import SupCon
from contrastive_cli.methods.triplet import Triplet
from contrastive_cli.methods.vicreg import VICReg
from contrastive_cli.models.encoders import ConvNet
from contrastive_cli.models.heads import DINOHead, mlp_head
from tests.fakes import Flat, on_replicas, rank_blocks, views

HEAD = partial(mlp_head, hidden_dim=8, out_dim=4, batch_norm=False)


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


# --------------------------------------------------------------------------- SimSiam
def naive_negative_cosine(p: Tensor, z: Tensor) -> Tensor:
    """mean_n -cos(p_n, z_n), a loop over rows; z is used as given (detach it for SimSiam)."""
    terms = [-(p[n] @ z[n]) / (p[n].norm() * z[n].norm()) for n in range(p.shape[0])]
    return torch.stack(terms).mean()


def test_simsiam_is_the_symmetric_negative_cosine_and_no_gradient_reaches_the_targets():
    torch.manual_seed(0)
    method = SimSiam(Flat(), HEAD, HEAD, projection_dim=4).double()
    v1, v2 = (v.double() for v in views(5))
    params = list(method.parameters())
    loss = method([v1, v2])
    got = torch.autograd.grad(loss, params)

    def naive(stop_gradient: bool) -> Tensor:
        z1, z2 = method.projector(method.encoder(v1)), method.projector(method.encoder(v2))
        p1, p2 = method.predictor(z1), method.predictor(z2)
        t1, t2 = (z1.detach(), z2.detach()) if stop_gradient else (z1, z2)
        return (naive_negative_cosine(p1, t2) + naive_negative_cosine(p2, t1)) / 2

    reference = naive(stop_gradient=True)
    assert loss.item() == pytest.approx(reference.item(), rel=1e-12)
    for g, r in zip(got, torch.autograd.grad(reference, params), strict=True):
        torch.testing.assert_close(g, r, rtol=1e-10, atol=1e-12)
    # Non-vacuous: letting the gradient through the targets changes the encoder's gradient.
    through = torch.autograd.grad(naive(stop_gradient=False), params)
    assert not torch.allclose(got[0], through[0], rtol=1e-6, atol=1e-9)


# --------------------------------------------------------------------------- Barlow, VICReg
def test_barlow_and_vicreg_apply_their_loss_to_the_projections_of_both_views():
    torch.manual_seed(0)
    barlow = BarlowTwins(Flat(), HEAD, lambda_offdiag=0.02, scale=0.5)
    vicreg = VICReg(Flat(), HEAD, sim_coeff=2.0, std_coeff=3.0, cov_coeff=4.0)
    v1, v2 = views(6)
    z = [barlow.projector(barlow.encoder(v)) for v in (v1, v2)]
    assert barlow([v1, v2]).item() == pytest.approx(
        barlow_twins_loss(*z, lambda_offdiag=0.02, scale=0.5).item(), rel=1e-6
    )
    z = [vicreg.expander(vicreg.encoder(v)) for v in (v1, v2)]
    assert vicreg([v1, v2]).item() == pytest.approx(vicreg_loss(*z, 2.0, 3.0, 4.0).item(), rel=1e-6)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: BarlowTwins(Flat(), HEAD, lambda_offdiag=-1.0), "loss.lambda_offdiag"),
        (lambda: BarlowTwins(Flat(), HEAD, scale=0.0), "loss.scale"),
        (lambda: VICReg(Flat(), HEAD, std_coeff=-1.0), "loss.std_coeff"),
        (lambda: SupCon(Flat(), HEAD, temperature=0.0), "loss.temperature"),
        (lambda: Contrastive(Flat(), HEAD, margin=0.0), "loss.margin"),
        (lambda: Contrastive(Flat(), HEAD, distance="manhattan"), "loss.distance"),
        (lambda: Contrastive(Flat(), HEAD, positives="classes"), "loss.positives"),
        (lambda: DINO(Flat(), DINO_HEAD, center_momentum=1.0), "loss.center_momentum"),
        (lambda: DINO(Flat(), DINO_HEAD, student_temp=0.0), "loss.student_temp"),
        (lambda: DINO(Flat(), DINO_HEAD, teacher_temp_warmup=2.0), "loss.teacher_temp_warmup"),
    ],
)
def test_bad_method_settings_are_refused_when_built(make, match):
    with pytest.raises(ValueError, match=match):
        make()


# --------------------------------------------------------------------------- SupCon
def test_supcon_uses_the_labels_and_refuses_to_run_without_them():
    torch.manual_seed(0)
    method = SupCon(Flat(), HEAD, temperature=0.2)
    assert SupCon.needs_labels  # what validate.check_data reads
    v1, v2 = views(6)
    labels = torch.tensor([0, 1, 0, 2, 1, 2])
    z1, z2 = (method.projector(method.encoder(v)) for v in (v1, v2))
    assert method([v1, v2], labels).item() == pytest.approx(
        supcon_loss(z1, z2, labels, 0.2).item(), rel=1e-6
    )
    with pytest.raises(ValueError, match="labelled"):
        method([v1, v2], None)


# --------------------------------------------------------------------------- contrastive
@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_contrastive_positives_are_the_two_views_or_the_labels(distance):
    torch.manual_seed(0)
    by_views = Contrastive(Flat(), HEAD, margin=0.8, distance=distance)
    by_labels = copy.deepcopy(by_views)
    by_labels.positives = "labels"
    v1, v2 = views(6)
    labels = torch.tensor([0, 1, 0, 2, 1, 2])
    z = by_views.projector(by_views.encoder(torch.cat([v1, v2])))
    image_ids = torch.arange(6).repeat(2)
    assert by_views([v1, v2], labels).item() == pytest.approx(
        contrastive_loss(z, image_ids, 0.8, distance).item(), rel=1e-6
    )
    assert by_labels([v1, v2], labels).item() == pytest.approx(
        contrastive_loss(z, torch.cat([labels, labels]), 0.8, distance).item(), rel=1e-6
    )
    with pytest.raises(ValueError, match="labelled"):
        by_labels([v1, v2], None)


# --------------------------------------------------------------------------- DINO
DINO_HEAD = partial(DINOHead, hidden_dim=8, bottleneck_dim=5, out_dim=7)


class Pooled(nn.Module):
    """A BatchNorm-free encoder that pools globally, so it takes crops of any size and a
    sample's features do not depend on its batch."""

    out_dim = 6

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 6, 3, padding=1), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def make_dino(**kwargs) -> DINO:
    torch.manual_seed(0)
    dino = DINO(Pooled(), DINO_HEAD, **kwargs).double()
    with torch.no_grad():  # student != teacher
        for p in [*dino.encoder.parameters(), *dino.head.parameters()]:
            p.add_(0.1 * torch.randn_like(p))
    return dino


def crops(n: int, local: int, seed: int = 0) -> list[Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64) for _ in range(2)] + [
        torch.randn(n, 1, 4, 4, generator=g, dtype=torch.float64) for _ in range(local)
    ]


@pytest.mark.parametrize("local", [0, 3])
def test_dino_student_sees_every_crop_and_the_teacher_only_the_globals(local):
    dino = make_dino()
    with torch.no_grad():
        dino.center.copy_(torch.randn(1, 7, dtype=torch.float64))
    v = crops(4, local)
    loss = dino(v)
    student = [dino.head(dino.encoder(x)) for x in v]
    with torch.no_grad():
        teacher = [dino.teacher_head(dino.teacher_encoder(x)) for x in v[:2]]
    expected = dino_loss(student, teacher, dino.center, 0.1, 0.04)  # warm-up starts at 0.04
    assert loss.item() == pytest.approx(expected.item(), rel=1e-12)
    # Non-vacuous: a teacher that also saw the local crops gives another loss.
    if local:
        with torch.no_grad():
            more = teacher + [dino.teacher_head(dino.teacher_encoder(x)) for x in v[2:]]
        assert dino_loss(student, more, dino.center, 0.1, 0.04).item() != pytest.approx(
            loss.item(), rel=1e-9
        )


def test_dino_no_gradient_reaches_the_teacher_or_the_centre():
    dino = make_dino()
    loss = dino(crops(4, 2))
    loss.backward()
    teacher = [*dino.teacher_encoder.parameters(), *dino.teacher_head.parameters()]
    assert teacher and all(not p.requires_grad and p.grad is None for p in teacher)
    assert "center" in dict(dino.named_buffers()) and not dino.center.requires_grad
    assert all(p.grad is not None for p in [*dino.encoder.parameters(), *dino.head.parameters()])


@pytest.mark.parametrize("step", [1, 40, 100])
def test_dino_after_step_moves_teacher_and_centre_by_their_formulas(step):
    """Teacher: tau from the cosine schedule at step - 1 (as BYOL); centre: 0.9 c + 0.1 times
    the mean over every row of both global crops' teacher outputs (paper eq. 4)."""
    dino, total = make_dino(base_momentum=0.9, center_momentum=0.8), 100
    with torch.no_grad():
        dino.center.copy_(torch.randn(1, 7, dtype=torch.float64))
    v = crops(5, 2)
    dino(v)
    with torch.no_grad():
        outputs = torch.cat([dino.teacher_head(dino.teacher_encoder(x)) for x in v[:2]])  # (10, 7)
    mean = [sum(float(outputs[r, k]) for r in range(10)) / 10 for k in range(7)]
    expected_center = [0.8 * float(dino.center[0, k]) + 0.2 * mean[k] for k in range(7)]
    tau = 1 - (1 - 0.9) * (math.cos(math.pi * (step - 1) / total) + 1) / 2
    pairs = [(dino.encoder, dino.teacher_encoder), (dino.head, dino.teacher_head)]
    old = [[p.clone() for p in t.parameters()] for _, t in pairs]
    dino.after_step(step, total)
    assert dino.center[0].tolist() == pytest.approx(expected_center, rel=1e-10, abs=1e-12)
    for (online, target), before in zip(pairs, old, strict=True):
        for p_t, p_old, p_o in zip(target.parameters(), before, online.parameters(), strict=True):
            assert torch.allclose(p_t, tau * p_old + (1 - tau) * p_o, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(
    "step, total, expected",
    [(0, 100, 0.04), (15, 100, 0.055), (30, 100, 0.07), (80, 100, 0.07)],
)
def test_dino_teacher_temperature_warms_up_over_a_fraction_of_training(step, total, expected):
    """0.04 -> 0.07 linearly over the first 30% of the steps, then 0.07; the loss uses it."""
    dino = make_dino()
    v = crops(4, 0)
    dino(v)
    if step:
        dino.after_step(step, total)
    assert dino.teacher_temp() == pytest.approx(expected)
    student = [dino.head(dino.encoder(x)) for x in v]
    with torch.no_grad():
        teacher = [dino.teacher_head(dino.teacher_encoder(x)) for x in v]
    assert dino(v).item() == pytest.approx(
        dino_loss(student, teacher, dino.center, 0.1, expected).item(), rel=1e-6
    )


def test_dino_state_in_a_checkpoint_resumes_the_same_schedule():
    """Centre, teacher and the temperature's clock are state: a fresh DINO loaded from
    another's state_dict (even one that already read its own clock) continues like it."""
    dino = make_dino()
    dino(crops(4, 0))
    dino.after_step(12, 100)
    fresh = make_dino()
    assert fresh.teacher_temp() == pytest.approx(0.04)  # reads (and caches) its own clock
    fresh.load_state_dict(dino.state_dict())
    assert fresh.teacher_temp() == dino.teacher_temp() == pytest.approx(0.04 + 0.03 * 12 / 30)
    assert torch.equal(fresh.center, dino.center)
    v = crops(4, 1, seed=5)
    assert fresh(v).item() == dino(v).item()


# --------------------------------------------------------------------------- every method
def build(kind: str) -> nn.Module:
    torch.manual_seed(0)
    encoder = ConvNet(1, 8, widths=(4, 8), strides=(2, 2))
    head = partial(mlp_head, hidden_dim=16, out_dim=8, batch_norm=True)
    deep = partial(mlp_head, hidden_dim=16, out_dim=8, layers=3, output_batch_norm=True)
    return {
        "simclr": lambda: SimCLR(encoder, head),
        "moco": lambda: MoCo(encoder, head, queue_size=32, out_dim=8),
        "byol": lambda: BYOL(encoder, head, head, projection_dim=8),
        "triplet": lambda: Triplet(encoder, head),
        "triplet_labels": lambda: Triplet(encoder, head, mining="hard", positives="labels"),
        "simsiam": lambda: SimSiam(encoder, deep, head, projection_dim=8),
        "barlow": lambda: BarlowTwins(encoder, head),
        "vicreg": lambda: VICReg(encoder, head),
        "supcon": lambda: SupCon(encoder, head),
        "dino": lambda: DINO(
            encoder, partial(DINOHead, hidden_dim=16, bottleneck_dim=8, out_dim=32)
        ),
        "contrastive": lambda: Contrastive(encoder, head),
        "contrastive_labels": lambda: Contrastive(encoder, head, positives="labels"),
    }[kind]()


MOMENTUM = ("key_", "target_", "teacher_")  # EMA copies: no gradient, moved in after_step
KINDS = [
    "simclr",
    "moco",
    "byol",
    "triplet",
    "triplet_labels",
    "simsiam",
    "barlow",
    "vicreg",
    "supcon",
    "dino",
    "contrastive",
    "contrastive_labels",
]


@pytest.mark.parametrize("kind", KINDS)
def test_method_step_is_a_finite_scalar_that_trains_only_online_parameters(kind):
    method = build(kind)
    v1, v2 = views(8, shape=(1, 8, 8))
    loss = method([v1, v2], torch.tensor([0, 1, 2, 3, 0, 1, 2, 3]))
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    online = {n: p for n, p in method.named_parameters() if not n.startswith(MOMENTUM)}
    momentum = {n: p for n, p in method.named_parameters() if n.startswith(MOMENTUM)}
    assert all(p.grad is not None for p in online.values()), [
        n for n, p in online.items() if p.grad is None
    ]
    assert any(p.grad.abs().sum() > 0 for p in method.encoder.parameters())
    assert all(not p.requires_grad and p.grad is None for p in momentum.values())
    assert bool(momentum) == (kind in ("moco", "byol", "dino"))
    method.after_step(1, 10)  # the step's state update runs


# --------------------------------------------------------------------------- several processes
def rank_views(world: int, n: int) -> tuple[Tensor, Tensor, list[tuple[Tensor, Tensor]]]:
    v1, v2 = views(world * n, seed=3)
    return v1, v2, rank_blocks(world, v1, v2)


@pytest.mark.parametrize(
    "make",
    [
        lambda: SimCLR(Flat(), HEAD, temperature=0.3),
        lambda: Triplet(Flat(), HEAD, margin=0.5, mining="hard"),
        lambda: Triplet(Flat(), HEAD, margin=0.5, mining="semihard"),
        lambda: Triplet(Flat(), HEAD, margin=0.5, mining="all"),
        lambda: BarlowTwins(Flat(), HEAD),
        lambda: VICReg(Flat(), HEAD),
        lambda: Contrastive(Flat(), HEAD, margin=1.5),
        lambda: Contrastive(Flat(), HEAD, margin=0.5, distance="cosine"),
    ],
    ids=[
        "simclr",
        "triplet-hard",
        "triplet-semihard",
        "triplet-all",
        "barlow",
        "vicreg",
        "contrastive",
        "contrastive-cosine",
    ],
)
def test_method_mean_over_ranks_equals_the_whole_batch(make):
    """Each process sees its share of the images; the candidates come from all of them."""
    torch.manual_seed(0)
    method = make()
    world, n = 2, 4
    v1, v2, per_rank = rank_views(world, n)
    losses = on_replicas(method, per_rank, lambda m, a, b: m([a, b]).item())
    assert sum(losses) / world == pytest.approx(method([v1, v2]).item(), rel=1e-6)


def test_moco_enqueues_the_keys_of_every_rank_in_rank_order():
    moco = make_moco()
    world, n = 2, 3
    _, _, per_rank = rank_views(world, n)

    def step(replica: MoCo, a: Tensor, b: Tensor) -> Tensor:
        replica([a, b])
        replica.after_step(1, 10)
        return replica.queue.keys

    queues = on_replicas(moco, per_rank, step)
    with torch.no_grad():
        keys = torch.cat([moco.key_projector(moco.key_encoder(b)) for _, b in per_rank])
    for queue in queues:
        assert torch.allclose(queue[: world * n], F.normalize(keys, dim=1), atol=1e-6)

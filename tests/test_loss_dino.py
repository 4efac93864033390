"""DINO's loss against loops over crop pairs, rows and classes; closed forms; the
stop-gradients; the centre over the global batch; the teacher-temperature warm-up."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import Tensor

from contrastive_cli.distributed import local_only
from contrastive_cli.losses import dino_center, dino_loss, teacher_temperature
from tests.fakes import run_ranks
from tests.losscheck import assert_close, randn, value_and_grads


def naive_dino(
    students: list[Tensor], teachers: list[Tensor], center: Tensor, ts: float, tt: float
):
    """Algorithm 1 written out: H(P_t, P_s) = sum_k -P_t log P_s, averaged over rows and over
    the pairs of a teacher crop with every other student crop."""
    k = center.shape[-1]
    c = center.reshape(-1).detach()
    pairs = []
    for iq, t in enumerate(teachers):
        t = t.detach()
        for v, s in enumerate(students):
            if v == iq:
                continue
            rows = []
            for n in range(t.shape[0]):
                z_t = sum(math.exp((float(t[n, j]) - float(c[j])) / tt) for j in range(k))
                z_s = torch.log(sum(torch.exp(s[n, j] / ts) for j in range(k)))
                rows.append(
                    sum(
                        -math.exp((float(t[n, j]) - float(c[j])) / tt) / z_t * (s[n, j] / ts - z_s)
                        for j in range(k)
                    )
                )
            pairs.append(sum(rows) / len(rows))
    return sum(pairs) / len(pairs)


@pytest.mark.parametrize("n,k", [(1, 3), (4, 5)])
@pytest.mark.parametrize("crops", [(2, 2), (2, 4), (1, 3)])  # (teacher, student) crops
@pytest.mark.parametrize("ts,tt", [(0.1, 0.04), (0.5, 0.07)])
def test_dino_equals_naive_value_and_gradients(n, k, crops, ts, tt):
    g, v = crops
    teachers = [randn(n, k, seed=10 + i) for i in range(g)]
    students = [randn(n, k, seed=20 + i) for i in range(v)]
    center = randn(1, k, seed=30)

    def ours(*s):
        return dino_loss(list(s), teachers, center, ts, tt)

    def naive(*s):
        return naive_dino(list(s), teachers, center, ts, tt)

    value, grads = value_and_grads(ours, *students)
    expected, expected_grads = value_and_grads(naive, *students)
    assert_close(value, expected)
    for a, b in zip(grads, expected_grads, strict=True):
        assert_close(a, b)


def test_dino_uniform_teacher_and_student_is_log_k():
    k = 7
    center = randn(1, k, seed=0)
    teachers = [center.expand(3, k).clone() for _ in range(2)]  # centred away: uniform
    students = [torch.full((3, k), 0.3, dtype=torch.float64) for _ in range(4)]
    assert_close(dino_loss(students, teachers, center), math.log(k))


def test_dino_uniform_teacher_closed_form():
    """P_t uniform: H = logsumexp(s / T) - mean_k(s / T) per row (>= log K)."""
    k, ts = 6, 0.2
    teachers = [torch.zeros(5, k, dtype=torch.float64) for _ in range(2)]
    students = [randn(5, k, seed=i) for i in range(3)]
    per_crop = [((s / ts).logsumexp(1) - (s / ts).mean(1)).mean() for s in students]
    # pairs: teacher 0 with students 1, 2; teacher 1 with students 0, 2
    expected = (per_crop[1] + per_crop[2] + per_crop[0] + per_crop[2]) / 4
    got = dino_loss(students, teachers, torch.zeros(k, dtype=torch.float64), ts)
    assert_close(got, expected)
    assert got.item() > math.log(k)


def test_dino_sharp_teacher_is_the_students_cross_entropy():
    """A very sharp teacher is one-hot at its argmax: H = -log P_s[argmax]."""
    k = 4
    t = torch.tensor([[5.0, 0.0, 0.0, 0.0], [0.0, 0.0, 5.0, 0.0]], dtype=torch.float64)
    s = randn(2, k, seed=3)
    expected = -torch.log_softmax(s / 0.1, 1)[[0, 1], [0, 2]].mean()
    got = dino_loss([t.clone(), s], [t], torch.zeros(1, k, dtype=torch.float64), 0.1, 0.01)
    assert_close(got, expected, rel=1e-9)


def test_dino_sends_no_gradient_to_the_teacher_or_the_centre():
    students = [randn(3, 4, seed=i).requires_grad_(True) for i in range(3)]
    teachers = [randn(3, 4, seed=10 + i).requires_grad_(True) for i in range(2)]
    center = randn(1, 4, seed=20).requires_grad_(True)
    dino_loss(students, teachers, center).backward()
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in students)
    assert all(t.grad is None for t in teachers) and center.grad is None


def test_dino_rejects_bad_inputs():
    s, t, c = [randn(2, 3, seed=i) for i in range(3)], [randn(2, 3, seed=9)] * 2, torch.zeros(3)
    with pytest.raises(ValueError, match="student_temp"):
        dino_loss(s, t, c, student_temp=0.0)
    with pytest.raises(ValueError, match="teacher_temp"):
        dino_loss(s, t, c, teacher_temp=-0.1)
    with pytest.raises(ValueError, match="crops"):
        dino_loss(s[:1], t, c)
    with pytest.raises(ValueError, match="one shape"):
        dino_loss([*s, randn(2, 4, seed=5)], t, c)


# --------------------------------------------------------------------------- centre
def test_dino_center_is_the_momentum_average_of_the_batch_mean():
    teachers = [randn(4, 5, seed=0), randn(4, 5, seed=1)]
    center = randn(1, 5, seed=2)
    mean = torch.cat(teachers).mean(0, keepdim=True)  # both crops' rows
    assert_close(dino_center(teachers, center, 0.9), 0.9 * center + 0.1 * mean)
    assert_close(dino_center(teachers, center, 0.0), mean)
    assert_close(dino_center([center.expand(6, 5)], center, 0.5), center)  # a fixed point


def test_dino_center_uses_the_global_batch_and_no_gradient():
    world, n = 3, 2
    teachers = [randn(world * n, 5, seed=0).requires_grad_(True), randn(world * n, 5, seed=1)]
    center = torch.zeros(1, 5, dtype=torch.float64)
    whole = dino_center(teachers, center, 0.9, local_only)
    per_rank = [tuple(t[r * n : (r + 1) * n] for t in teachers) for r in range(world)]
    centres = run_ranks(lambda g, a, b: dino_center([a, b], center, 0.9, g), per_rank)
    for c in centres:
        assert_close(c, whole)  # every process holds the same centre, the global batch's
    assert not whole.requires_grad
    with pytest.raises(ValueError, match="momentum"):
        dino_center(teachers, center, 1.0)


# --------------------------------------------------------------------------- temperature
def test_teacher_temperature_warms_up_linearly_then_stays():
    assert teacher_temperature(0) == pytest.approx(0.04)
    assert teacher_temperature(15) == pytest.approx(0.055)
    assert teacher_temperature(7.5) == pytest.approx(0.04 + 0.03 / 4)  # fractional epochs
    assert teacher_temperature(30) == pytest.approx(0.07)
    assert teacher_temperature(300) == pytest.approx(0.07)
    assert teacher_temperature(0, 0.04, 0.06, warmup_epochs=0) == pytest.approx(0.06)
    steps = [teacher_temperature(e / 10, warmup_epochs=3) for e in range(40)]
    assert all(b >= a for a, b in itertools.pairwise(steps))
    with pytest.raises(ValueError, match="temperatures"):
        teacher_temperature(1, 0.0)
    with pytest.raises(ValueError, match="warmup_epochs"):
        teacher_temperature(1, warmup_epochs=-1)

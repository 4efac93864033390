"""The pairwise margin loss of Hadsell et al. against a loop over pairs, closed forms, and
the multi-process contract."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from contrastive_cli.losses import contrastive_loss
from tests.losscheck import assert_close, assert_matches, assert_ranks_equal_whole, randn


def naive_contrastive(e: Tensor, ids: list[int], margin: float, distance: str) -> Tensor:
    """Eq. 4 per pair with its 1/2s; positive and negative pairs averaged separately."""
    unit = [x / x.norm() for x in e]
    positive, negative = [], []
    for a in range(len(ids)):
        for j in range(len(ids)):
            if j == a:
                continue
            if distance == "euclidean":
                d = torch.sqrt(((unit[a] - unit[j]) ** 2).sum())
            else:
                d = 1 - unit[a] @ unit[j]
            if ids[j] == ids[a]:
                positive.append(0.5 * d**2)
            else:
                negative.append(0.5 * torch.relu(margin - d) ** 2)
    mean = lambda terms: sum(terms) / len(terms) if terms else e.new_zeros(())  # noqa: E731
    return mean(positive) + mean(negative)


def view_ids(n: int) -> list[int]:
    return list(range(n)) * 2


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
@pytest.mark.parametrize("margin", [0.5, 1.0, 2.0])
@pytest.mark.parametrize(
    "ids", [view_ids(1), view_ids(4), [0, 0, 1, 1, 1, 2], [5, 6, 7], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]]
)
@pytest.mark.parametrize("d", [2, 8])
def test_contrastive_equals_naive_value_and_gradients(distance, margin, ids, d):
    e = randn(len(ids), d, seed=len(ids) + d)
    y = torch.tensor(ids)
    assert_matches(
        lambda x: contrastive_loss(x, y, margin, distance),
        lambda x: naive_contrastive(x, ids, margin, distance),
        e,
    )


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
def test_contrastive_closed_forms(distance):
    # Identical positives, negatives orthogonal: euclidean d = sqrt(2), cosine d = 1.
    e = torch.eye(3, dtype=torch.float64).repeat(2, 1)
    ids = torch.tensor(view_ids(3))
    d_neg = math.sqrt(2) if distance == "euclidean" else 1.0
    for margin in (0.5, 1.2, 2.0):
        expected = 0.5 * max(0.0, margin - d_neg) ** 2
        assert_close(contrastive_loss(e, ids, margin, distance), expected)
    # Collapse: every distance 0, so only the negatives' hinge counts: m^2 / 2.
    collapsed = torch.ones(6, 4, dtype=torch.float64)
    assert_close(contrastive_loss(collapsed, ids, 0.8, distance), 0.5 * 0.8**2)
    # Opposite views of one image, no negatives: euclidean d^2 = 4, cosine d^2 = 4.
    pair = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)
    assert_close(contrastive_loss(pair, torch.tensor([0, 0]), 1.0, distance), 0.5 * 4)


def views_at_angle(images: int, angle: float) -> Tensor:
    """View 1 of image k is e_2k, view 2 is e_2k turned by ``angle`` towards e_2k+1: every
    positive pair is at euclidean distance sqrt(2 - 2 cos(angle)), every negative at sqrt(2)."""
    e = torch.zeros(2 * images, 2 * images, dtype=torch.float64)
    for k in range(images):
        e[k, 2 * k] = 1.0
        e[images + k, 2 * k] = math.cos(angle)
        e[images + k, 2 * k + 1] = math.sin(angle)
    return e


@pytest.mark.parametrize("margin", [1.0, 1.8])
def test_contrastive_weighs_positives_and_negatives_equally_at_any_batch_size(margin):
    """With 2 views of K images there are 2K positive and 4K^2 - 4K negative pairs; the loss
    is 1/2 d_p^2 + 1/2 max(0, m - d_n)^2 for every K, where a mean over all pairs would let
    the negatives' share grow with K."""
    angle = 1.0
    expected = 0.5 * (2 - 2 * math.cos(angle)) + 0.5 * max(0.0, margin - math.sqrt(2)) ** 2
    for images in (2, 5, 9):
        ids = torch.tensor(view_ids(images))
        assert_close(contrastive_loss(views_at_angle(images, angle), ids, margin), expected)


def test_contrastive_identical_negatives_have_a_finite_gradient():
    e = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    e.requires_grad_(True)
    contrastive_loss(e, torch.tensor([0, 1, 1]), 1.0).backward()
    assert torch.isfinite(e.grad).all()


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
@pytest.mark.parametrize("world", [2, 3])
def test_contrastive_ranks_equal_the_whole_batch(distance, world):
    """Rank r holds both views (rows 2k, 2k+1) of its images; ids unique across ranks."""
    n = 3
    e = randn(2 * world * n, 5, seed=world)
    ids = torch.arange(world * n).repeat_interleave(2)
    loss = lambda g, x, y: contrastive_loss(x, y, 1.0, distance, g)  # noqa: E731
    assert_ranks_equal_whole(loss, world, e, ids)


def test_contrastive_rejects_bad_hyperparameters():
    e, ids = randn(4, 3, seed=0), torch.tensor([0, 0, 1, 1])
    with pytest.raises(ValueError, match="distance"):
        contrastive_loss(e, ids, 1.0, "manhattan")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="margin"):
        contrastive_loss(e, ids, 0.0)
    with pytest.raises(ValueError, match="ids"):
        contrastive_loss(e, ids[:3], 1.0)


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
@pytest.mark.parametrize("world", [2, 3])
def test_contrastive_with_class_ids_is_the_whole_batchs_over_ranks(distance, world):
    """Same-class positives give ranks different numbers of pairs; the means are over every
    rank's pairs, so the ranks still give the whole batch's loss and gradient."""
    n = 4
    e = randn(2 * world * n, 5, seed=world + 20)
    ids = torch.tensor(
        [0] * (2 * n - 1)
        + [1]
        + [1, 2, 2] * (2 * n * (world - 1) // 3)
        + [1] * (2 * n * (world - 1) % 3)
    )
    loss = lambda g, x, y: contrastive_loss(x, y, 1.0, distance, g)  # noqa: E731
    assert_ranks_equal_whole(loss, world, e, ids)

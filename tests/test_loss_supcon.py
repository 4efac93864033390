"""SupCon L_out against a loop over anchors, positives and candidates, closed forms, its
SimCLR special case, and the multi-process contract."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from contrastive_cli.losses import nt_xent, supcon_loss
from tests.losscheck import assert_close, assert_matches, assert_ranks_equal_whole, randn


def naive_supcon(z1: Tensor, z2: Tensor, labels: list[int], t: float) -> Tensor:
    """Eq. 2: views 0..N-1 are z1's rows, N..2N-1 z2's; averaged over the anchors."""
    views = [*z1, *z2]
    view_labels = labels * 2

    def s(a: Tensor, b: Tensor) -> Tensor:
        return (a @ b) / (a.norm() * b.norm()) / t

    total, anchors = z1.new_zeros(()), 0
    for i, anchor in enumerate(views):
        others = [k for k in range(len(views)) if k != i]
        positives = [p for p in others if view_labels[p] == view_labels[i]]
        if not positives:
            continue
        log_denominator = torch.log(sum(torch.exp(s(anchor, views[a])) for a in others))
        total = total - sum(s(anchor, views[p]) - log_denominator for p in positives) / len(
            positives
        )
        anchors += 1
    return total / anchors


@pytest.mark.parametrize(
    "labels",
    [[0, 1], [0, 0, 1], [2, 2, 2, 2], [3, 1, 4, 1, 5, 9, 2, 6, 5, 3]],
)
@pytest.mark.parametrize("d", [2, 8])
@pytest.mark.parametrize("t", [0.07, 0.1, 1.0])
def test_supcon_equals_naive_value_and_gradients(labels, d, t):
    n = len(labels)
    z1, z2, y = randn(n, d, seed=n + d), randn(n, d, seed=2 * n + d), torch.tensor(labels)
    assert_matches(
        lambda a, b: supcon_loss(a, b, y, t), lambda a, b: naive_supcon(a, b, labels, t), z1, z2
    )


def test_supcon_with_one_label_per_image_is_nt_xent():
    z1, z2 = randn(7, 5, seed=0), randn(7, 5, seed=1)
    assert_close(supcon_loss(z1, z2, torch.arange(7), 0.3), nt_xent(z1, z2, 0.3))


@pytest.mark.parametrize("n", [1, 3, 6])
@pytest.mark.parametrize("t", [0.1, 0.5])
def test_supcon_one_class_of_orthogonal_images_closed_form(n, t):
    """Both views of image n are e_n, all one class: for every anchor the other view has
    s = 1/T, the 2N - 2 other candidates 0, and all 2N - 1 are positives, so
    l = log(e^(1/T) + 2N - 2) - 1 / (T (2N - 1))."""
    e = torch.eye(n, dtype=torch.float64)
    expected = math.log(math.exp(1 / t) + 2 * n - 2) - 1 / (t * (2 * n - 1))
    assert_close(supcon_loss(e, e.clone(), torch.zeros(n, dtype=torch.long), t), expected)


def test_supcon_same_class_pulls_together():
    """Moving an image next to its class-mate lowers the loss; next to another class's raises it."""
    z1 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
    labels = torch.tensor([0, 0, 1])
    base = supcon_loss(z1, z1.clone(), labels, 0.1).item()
    closer = z1.clone()
    closer[1] = torch.tensor([0.6, 0.8])
    farther = z1.clone()
    farther[1] = torch.tensor([-0.6, 0.8])
    assert supcon_loss(closer, closer.clone(), labels, 0.1).item() < base
    assert supcon_loss(farther, farther.clone(), labels, 0.1).item() > base


@pytest.mark.parametrize("world", [2, 3])
def test_supcon_ranks_equal_the_whole_batch(world):
    n = 4 * world
    z1, z2 = randn(n, 6, seed=world), randn(n, 6, seed=world + 1)
    labels = torch.tensor([0, 1, 2, 1, 0, 2, 2, 1, 0, 0, 1, 2])[:n]
    loss = lambda g, a, b, y: supcon_loss(a, b, y, 0.2, g)  # noqa: E731
    assert_ranks_equal_whole(loss, world, z1, z2, labels)
    # Other processes' same-class images are positives: a purely local loss differs.
    local = supcon_loss(z1[:4], z2[:4], labels[:4], 0.2).item()
    assert local != pytest.approx(supcon_loss(z1, z2, labels, 0.2).item(), rel=1e-3)


def test_supcon_rejects_bad_inputs():
    z = randn(4, 3, seed=0)
    with pytest.raises(ValueError, match="temperature"):
        supcon_loss(z, z, torch.arange(4), 0.0)
    with pytest.raises(ValueError, match="labels"):
        supcon_loss(z, z, torch.arange(3), 0.1)

"""Each loss against a naive reference written from its paper, closed forms, and multi-process
equivalence. References loop over samples and pairs in plain Python on float64 tensors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor

from contrastive_cli.losses import byol_loss, moco_infonce, nt_xent, triplet_loss
from tests.fakes import run_ranks
from tests.losscheck import assert_ranks_equal_whole

SHAPES = [(2, 3), (5, 8), (16, 32)]  # (batch size, dimension)


def randn(*shape: int, seed: int) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def cos(a: Tensor, b: Tensor) -> float:
    return float(a @ b) / (float(a.norm()) * float(b.norm()))


def sq_dist(a: Tensor, b: Tensor) -> float:
    """Squared Euclidean distance of the unit vectors a/|a| and b/|b|."""
    return float(((a / a.norm() - b / b.norm()) ** 2).sum())


# --------------------------------------------------------------------------- NT-Xent
def naive_nt_xent(z1: Tensor, z2: Tensor, t: float) -> float:
    """SimCLR eq. 1, averaged over all 2N views: views 2k and 2k+1 are one image's pair."""
    views = [v for pair in zip(z1, z2, strict=True) for v in pair]
    total = 0.0
    for i, anchor in enumerate(views):
        j = i ^ 1
        denominator = sum(math.exp(cos(anchor, views[k]) / t) for k in range(len(views)) if k != i)
        total += -math.log(math.exp(cos(anchor, views[j]) / t) / denominator)
    return total / len(views)


@pytest.mark.parametrize("n,d", SHAPES)
@pytest.mark.parametrize("t", [0.07, 0.5, 1.0])
def test_nt_xent_equals_naive(n, d, t):
    z1, z2 = randn(n, d, seed=n), randn(n, d, seed=100 + d)
    assert nt_xent(z1, z2, t).item() == pytest.approx(naive_nt_xent(z1, z2, t), rel=1e-10)


def test_nt_xent_does_not_depend_on_the_norms():
    z1, z2 = randn(6, 4, seed=1), randn(6, 4, seed=2)
    scale = torch.rand(6, 1, dtype=torch.float64) * 10 + 0.1
    assert nt_xent(z1 * scale, z2, 0.5).item() == pytest.approx(
        nt_xent(z1, z2, 0.5).item(), rel=1e-12
    )


@pytest.mark.parametrize("n", [1, 2, 4, 8])
@pytest.mark.parametrize("t", [0.1, 0.5])
def test_nt_xent_aligned_orthogonal_pairs_closed_form(n, t):
    """Both views of image n are the basis vector e_n: s(positive) = 1, the 2N-2 others 0, so
    l = -log(e^(1/T) / (e^(1/T) + 2N - 2)) = log(1 + (2N - 2) e^(-1/T))."""
    e = torch.eye(n, dtype=torch.float64)
    expected = math.log(1 + (2 * n - 2) * math.exp(-1 / t))
    assert nt_xent(e, e.clone(), t).item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("world", [2, 3])
def test_nt_xent_mean_over_ranks_equals_the_whole_batch(world):
    n_local, d, t = 4, 6, 0.3
    z1, z2 = randn(world * n_local, d, seed=3), randn(world * n_local, d, seed=4)
    per_rank = [
        (z1[r * n_local : (r + 1) * n_local], z2[r * n_local : (r + 1) * n_local])
        for r in range(world)
    ]
    losses = run_ranks(lambda gather, a, b: nt_xent(a, b, t, gather), per_rank)
    whole = nt_xent(z1, z2, t).item()
    assert sum(loss.item() for loss in losses) / world == pytest.approx(whole, rel=1e-12)
    # Each rank's loss differs from a purely local loss: the other ranks' rows are negatives.
    assert losses[0].item() != pytest.approx(nt_xent(*per_rank[0], t).item(), rel=1e-6)


@pytest.mark.parametrize("world", [2, 4])
def test_nt_xent_ranks_give_the_whole_batchs_loss_and_gradient(world):
    """Simulated processes whose all-gather carries gradients (summed over processes in the
    backward, then averaged as DDP does): the whole batch's gradient, not 1/world of it."""
    z1, z2 = randn(3 * world, 5, seed=world), randn(3 * world, 5, seed=world + 1)
    assert_ranks_equal_whole(lambda g, a, b: nt_xent(a, b, 0.2, g), world, z1, z2)


@pytest.mark.parametrize("t", [0.0, -0.1])
def test_nt_xent_rejects_non_positive_temperature(t):
    with pytest.raises(ValueError, match="temperature"):
        nt_xent(randn(2, 3, seed=0), randn(2, 3, seed=1), t)


# --------------------------------------------------------------------------- MoCo InfoNCE
def naive_moco(q: Tensor, k: Tensor, queue: Tensor, t: float) -> float:
    """MoCo eq. 1: the key of the same image is the positive, every queue entry a negative."""
    total = 0.0
    for q_n, k_n in zip(q, k, strict=True):
        positive = math.exp(cos(q_n, k_n) / t)
        negatives = sum(math.exp(cos(q_n, key) / t) for key in queue)
        total += -math.log(positive / (positive + negatives))
    return total / len(q)


@pytest.mark.parametrize("n,d", SHAPES)
@pytest.mark.parametrize("queue_size", [1, 7, 64])
@pytest.mark.parametrize("t", [0.07, 0.2, 1.0])
def test_moco_infonce_equals_naive(n, d, queue_size, t):
    q, k, queue = randn(n, d, seed=n), randn(n, d, seed=d), randn(queue_size, d, seed=queue_size)
    assert moco_infonce(q, k, queue, t).item() == pytest.approx(
        naive_moco(q, k, queue, t), rel=1e-10
    )


@pytest.mark.parametrize("t", [0.1, 0.2])
def test_moco_infonce_aligned_keys_orthogonal_queue_closed_form(t):
    """q = k = e_0, queue = e_1..e_K: l = log(1 + K e^(-1/T))."""
    e = torch.eye(6, dtype=torch.float64)
    q = e[:1].repeat(3, 1)
    assert moco_infonce(q, q.clone(), e[1:], t).item() == pytest.approx(
        math.log(1 + 5 * math.exp(-1 / t))
    )


def test_moco_infonce_sends_no_gradient_to_keys_or_queue():
    q, k, queue = (randn(4, 5, seed=s).requires_grad_(True) for s in range(3))
    moco_infonce(q, k, queue, 0.2).backward()
    assert q.grad is not None and k.grad is None and queue.grad is None


@pytest.mark.parametrize("t", [0.0, -1.0])
def test_moco_infonce_rejects_non_positive_temperature(t):
    with pytest.raises(ValueError, match="temperature"):
        moco_infonce(randn(2, 3, seed=0), randn(2, 3, seed=1), randn(4, 3, seed=2), t)


# --------------------------------------------------------------------------- BYOL
def naive_byol(p: Tensor, z: Tensor) -> float:
    """BYOL eq. 2: ||p/|p| - z/|z|||^2 = 2 - 2 cos(p, z), averaged over the batch."""
    return sum(sq_dist(p_n, z_n) for p_n, z_n in zip(p, z, strict=True)) / len(p)


@pytest.mark.parametrize("n,d", SHAPES)
def test_byol_loss_equals_naive(n, d):
    p, z = randn(n, d, seed=n), randn(n, d, seed=d + 50)
    assert byol_loss(p, z).item() == pytest.approx(naive_byol(p, z), rel=1e-10)


def test_byol_loss_identical_vectors_is_zero_and_opposite_is_four():
    p = randn(8, 16, seed=0)
    assert byol_loss(p, p.clone()).item() == pytest.approx(0.0, abs=1e-12)
    assert byol_loss(p, 3.0 * p).item() == pytest.approx(0.0, abs=1e-12)  # scale-free
    assert byol_loss(p, -p).item() == pytest.approx(4.0, rel=1e-12)


def test_byol_loss_sends_no_gradient_to_the_target():
    p, z = randn(4, 5, seed=0).requires_grad_(True), randn(4, 5, seed=1).requires_grad_(True)
    byol_loss(p, z).backward()
    assert p.grad is not None and z.grad is None


# --------------------------------------------------------------------------- under autocast
@pytest.mark.parametrize("loss", ["ntxent", "moco", "byol"])
def test_losses_compute_in_float32_under_cpu_bf16_autocast(loss):
    """bf16 projections (as autocast's linear layers return them), positives nearly parallel
    (cosines near 1, where bf16 steps are 0.004): inside autocast the loss must still equal
    the float64 reference of those bf16 values to float32 precision."""
    z1 = randn(16, 32, seed=0).bfloat16()
    z2 = (z1.double() + 0.05 * randn(16, 32, seed=1)).bfloat16()
    queue = randn(64, 32, seed=2).bfloat16()
    t = 0.07
    cases = {
        "ntxent": (lambda: nt_xent(z1, z2, t), lambda: naive_nt_xent(z1.double(), z2.double(), t)),
        "moco": (
            lambda: moco_infonce(z1, z2, queue, t),
            lambda: naive_moco(z1.double(), z2.double(), queue.double(), t),
        ),
        "byol": (lambda: byol_loss(z1, z2), lambda: naive_byol(z1.double(), z2.double())),
    }
    compute, reference = cases[loss]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = compute()
    assert value.dtype == torch.float32
    assert math.isclose(value.item(), reference(), rel_tol=1e-5, abs_tol=1e-6)


# --------------------------------------------------------------------------- triplet
def naive_triplet(e: Tensor, ids: list[int], margin: float, mining: str) -> float:
    """FaceNet's hinge on squared distances of unit vectors, with Hermans et al.'s batch-hard,
    FaceNet's semi-hard (TF-Addons' fallback to the farthest negative) or all triplets."""
    n = len(ids)
    d = [[sq_dist(e[i], e[j]) for j in range(n)] for i in range(n)]
    terms: list[float] = []
    for a in range(n):
        positives = [p for p in range(n) if p != a and ids[p] == ids[a]]
        negatives = [m for m in range(n) if ids[m] != ids[a]]
        if not positives or not negatives:
            continue
        if mining == "hard":
            hardest_p = max(d[a][p] for p in positives)
            hardest_n = min(d[a][m] for m in negatives)
            terms.append(max(0.0, hardest_p - hardest_n + margin))
            continue
        for p in positives:
            if mining == "all":
                terms += [max(0.0, d[a][p] - d[a][m] + margin) for m in negatives]
                continue
            farther = [d[a][m] for m in negatives if d[a][m] > d[a][p]]
            d_n = min(farther) if farther else max(d[a][m] for m in negatives)
            terms.append(max(0.0, d[a][p] - d_n + margin))
    return sum(terms) / len(terms) if terms else 0.0


def view_ids(n: int) -> list[int]:
    """Two views of each of n images: rows k and n + k share an id."""
    return list(range(n)) * 2


@pytest.mark.parametrize("mining", ["hard", "semihard", "all"])
@pytest.mark.parametrize("margin", [0.0, 0.2, 1.0])
@pytest.mark.parametrize(
    "ids",
    [
        view_ids(2),
        view_ids(6),
        [0, 0, 1, 1, 1, 2, 2, 2, 2, 3],  # classes of different sizes, one without a positive
        [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3],
    ],
)
@pytest.mark.parametrize("d", [2, 16])
def test_triplet_loss_equals_naive(mining, margin, ids, d):
    e = randn(len(ids), d, seed=len(ids) + d)
    got = triplet_loss(e, torch.tensor(ids), margin, mining).item()
    assert got == pytest.approx(naive_triplet(e, ids, margin, mining), rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("mining", ["hard", "semihard", "all"])
def test_triplet_loss_is_zero_when_negatives_are_farther_by_more_than_the_margin(mining):
    """Two tight clusters on opposite sides: d(a, p) ~ 0, d(a, n) ~ 4 > margin."""
    base = torch.tensor([[1.0, 0.0, 0.0], [-1.0, 0.0, 0.0]], dtype=torch.float64)
    e = base.repeat_interleave(3, 0) + 0.01 * randn(6, 3, seed=0)
    ids = torch.tensor([0, 0, 0, 1, 1, 1])
    assert triplet_loss(e, ids, margin=1.0, mining=mining).item() == 0.0
    # ... and positive as soon as the margin exceeds the gap.
    assert triplet_loss(e, ids, margin=5.0, mining=mining).item() > 0.0


@pytest.mark.parametrize("ids", [[0, 1, 2, 3], [7, 7, 7]])
def test_triplet_loss_without_valid_anchors_is_zero_and_differentiable(ids):
    e = randn(len(ids), 4, seed=0).requires_grad_(True)
    loss = triplet_loss(e, torch.tensor(ids), 0.2, "hard")
    loss.backward()
    assert loss.item() == 0.0 and e.grad is not None


@pytest.mark.parametrize("mining", ["hard", "semihard", "all"])
def test_triplet_loss_mean_over_ranks_equals_the_whole_batch(mining):
    """Rank r holds both views of images r*n .. r*n+n-1; every rank has the same number of
    anchors, pairs and triplets, so the mean of the ranks' losses is the whole batch's."""
    world, n, d, margin = 2, 4, 5, 0.5
    e = randn(2 * world * n, d, seed=9)
    ids = torch.arange(world * n).repeat_interleave(2)  # rows 2k, 2k+1: image k
    rows = 2 * n
    per_rank = [
        (e[r * rows : (r + 1) * rows], ids[r * rows : (r + 1) * rows]) for r in range(world)
    ]
    losses = run_ranks(lambda gather, x, i: triplet_loss(x, i, margin, mining, gather), per_rank)
    whole = triplet_loss(e, ids, margin, mining).item()
    assert sum(loss.item() for loss in losses) / world == pytest.approx(whole, rel=1e-12)


@pytest.mark.parametrize("mining", ["hard", "semihard", "all"])
@pytest.mark.parametrize("world", [2, 3])
def test_triplet_loss_ranks_give_the_whole_batchs_loss_and_gradient(mining, world):
    """As above, with gradients: rank r holds both views (rows 2k, 2k+1) of its images."""
    n = 3
    e = randn(2 * world * n, 4, seed=world)
    ids = torch.arange(world * n).repeat_interleave(2)
    loss = lambda g, x, i: triplet_loss(x, i, 0.5, mining, g)  # noqa: E731
    assert_ranks_equal_whole(loss, world, e, ids)


def test_triplet_loss_rejects_bad_hyperparameters():
    e, ids = randn(4, 3, seed=0), torch.tensor([0, 0, 1, 1])
    with pytest.raises(ValueError, match="mining"):
        triplet_loss(e, ids, 0.2, "hardest")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="margin"):
        triplet_loss(e, ids, -0.1, "hard")


@pytest.mark.parametrize("mining", ["hard", "semihard", "all"])
@pytest.mark.parametrize("world", [2, 3])
def test_triplet_loss_with_class_ids_is_the_whole_batchs_over_ranks(mining, world):
    """Same-class positives: ranks hold different numbers of pairs and triplets (rank 0 has
    most of class 0 here), so a per-rank mean would weight them wrongly; the mean is taken
    over every rank's terms, and the ranks still give the whole batch's loss and gradient."""
    n = 4
    e = randn(2 * world * n, 4, seed=world + 10)
    ids = torch.tensor([0] * (2 * n - 1) + [1] + [1, 2] * (n * (world - 1)))
    loss = lambda g, x, i: triplet_loss(x, i, 0.5, mining, g)  # noqa: E731
    assert_ranks_equal_whole(loss, world, e, ids)

"""The evaluation protocol: k-NN against a naive loop, the linear probe's accuracy and its
choice of weight decay (never from the test split), and feature extraction."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from contrastive_cli.evaluate import (
    KnnMonitor,
    ProbeBasis,
    extract_features,
    fit_logistic,
    knn_predict,
    linear_probe,
    logistic_objective,
    pixel_features,
)
from contrastive_cli.evaluators import evaluate_features


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- k-NN
def naive_knn(
    train: torch.Tensor,
    labels: torch.Tensor,
    test: torch.Tensor,
    num_classes: int,
    k: int,
    t: float,
) -> list[int]:
    """Per query: cosine similarity to every bank row, the k most similar vote exp(sim / T)."""
    preds = []
    for q in test.double():
        sims = []
        for x, y in zip(train.double(), labels.tolist(), strict=True):
            sims.append((float(q @ x) / (float(q.norm()) * float(x.norm())), y))
        sims.sort(key=lambda s: -s[0])
        votes = [0.0] * num_classes
        for sim, y in sims[:k]:
            votes[y] += math.exp(sim / t)
        preds.append(max(range(num_classes), key=lambda c: votes[c]))
    return preds


@pytest.mark.parametrize("t", [0.005, 0.05, 0.1, 1.0])
def test_knn_equals_naive_for_several_k_including_more_than_the_bank(t):
    train, test = torch.randn(40, 6, generator=gen(0)), torch.randn(25, 6, generator=gen(1))
    labels = torch.randint(0, 4, (40,), generator=gen(2))
    ks = [1, 3, 10, 40, 100]  # 100 > the 40 bank rows
    preds = knn_predict(train, labels, test, 4, ks, t, chunk_size=7)  # several chunks
    for k in ks:
        assert preds[k].tolist() == naive_knn(train, labels, test, 4, k, t), k
    assert torch.equal(preds[100], preds[40])


def test_knn_votes_are_weighted_by_exp_similarity_over_t():
    """One close neighbour of class 0 against two farther ones of class 1 (k = 3): class 0
    wins at a small T (weights dominate), class 1 at a large T (nearly a plain majority)."""
    deg = torch.tensor([5.0, 40.0, 45.0]).deg2rad()
    bank = torch.stack([deg.cos(), deg.sin()], 1)
    labels, query = torch.tensor([0, 1, 1]), torch.tensor([[1.0, 0.0]])
    assert knn_predict(bank, labels, query, 2, (3,), 0.1)[3].item() == 0
    assert knn_predict(bank, labels, query, 2, (3,), 10.0)[3].item() == 1


def test_knn_small_temperature_does_not_overflow():
    """exp(sim / T) exceeds float32's range (3.4e38, exp(88.7)) once sim / T > 88.7: at
    T = 0.005 every neighbour closer than 0.44 weighs inf and the vote ties. The weights are
    exp((sim - 1) / T) instead: the same ratios, at most 1."""
    t = 0.005
    deg = torch.tensor([0.0, 8.0, 9.0, 25.0, 40.0]).deg2rad()
    bank = torch.stack([deg.cos(), deg.sin()], 1)
    labels = torch.tensor([2, 1, 1, 0, 0])
    query = torch.tensor([[1.0, 0.0]])
    assert (bank @ query.T).min() / t > 88.8  # every exp(sim / T) would be inf in float32
    # The nearest (class 2) outweighs two neighbours of class 1 at 8 and 9 degrees:
    # exp((cos 8 - 1) / T) + exp((cos 9 - 1) / T) = 0.14 + 0.09 < 1.
    assert naive_knn(bank, labels, query, 3, 5, t) == [2]
    assert knn_predict(bank, labels, query, 3, (5,), t)[5].tolist() == [2]
    assert knn_predict(bank, labels, query, 3, (5,), 1.0)[5].tolist() == [1]  # ~ majority


@pytest.mark.parametrize("t", [0.005, 0.001, 1e-4])
def test_knn_small_temperature_does_not_underflow_to_class_0(t):
    """exp((sim - 1) / T) underflowed to 0 for every neighbour of a query whose best similarity
    is 0.34 at T <= 0.005, and every query then voted for class 0. Shifted by each query's own
    best similarity, its nearest neighbour always weighs 1."""
    deg = torch.tensor([70.0, 72.0, 74.0, 80.0, 85.0]).deg2rad()  # cos 70 = 0.34: far from 1
    bank = torch.stack([deg.cos(), deg.sin()], 1)
    labels = torch.tensor([2, 2, 1, 0, 0])
    query = torch.tensor([[1.0, 0.0]])
    assert torch.exp(((bank @ query.T).max() - 1) / t) == 0  # the old weights: all zero
    assert knn_predict(bank, labels, query, 3, (5, 1), t) == {
        5: torch.tensor([2]),
        1: torch.tensor([2]),
    }


def test_knn_ignores_feature_norms():
    train, test = torch.randn(30, 5, generator=gen(0)), torch.randn(10, 5, generator=gen(1))
    labels = torch.randint(0, 3, (30,), generator=gen(2))
    scaled = train * torch.rand(30, 1, generator=gen(3)).add(0.1) * 10
    assert torch.equal(
        knn_predict(train, labels, test, 3, (5,))[5], knn_predict(scaled, labels, test, 3, (5,))[5]
    )


# --------------------------------------------------------------------------- linear probe
def blobs(
    n: int, num_classes: int, dim: int, spread: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gaussian classes around scaled basis vectors (linearly separable when spread is small)."""
    y = torch.arange(n) % num_classes
    centres = torch.eye(num_classes, dim) * 5
    return centres[y] + spread * torch.randn(n, dim, generator=gen(seed)), y


def correlated(n: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Features mixed by a random matrix (an ill-conditioned covariance, like real features),
    one constant column, labels from a noisy linear rule."""
    g = gen(seed)
    x = torch.randn(n, dim, generator=g) @ (
        torch.randn(dim, dim, generator=g) * 0.1 + torch.eye(dim)
    )
    x[:, 0] = 3.0  # constant: standardised to 0, a null direction of the covariance
    y = (x[:, 1:4] + 0.5 * torch.randn(n, 3, generator=g)).argmax(1)
    return x, y


def test_logistic_objective_equals_naive_cross_entropy_and_autograd_gradient():
    z, y = correlated(40, 6, seed=0)
    v = torch.randn(3, 6, generator=gen(1), dtype=torch.float64)
    b = torch.randn(3, generator=gen(2), dtype=torch.float64)
    l2 = torch.rand(6, generator=gen(3), dtype=torch.float64)
    z = z.double()
    loss, dv, db = logistic_objective(z, y, v, b, l2)
    naive = 0.0
    for z_n, y_n in zip(z.tolist(), y.tolist(), strict=True):
        logits = [sum(v[k, j].item() * z_n[j] for j in range(6)) + b[k].item() for k in range(3)]
        naive += -logits[y_n] + math.log(sum(math.exp(c) for c in logits))
    naive = naive / len(z) + 0.5 * sum(
        l2[j].item() * v[k, j].item() ** 2 for k in range(3) for j in range(6)
    )
    assert math.isclose(loss.item(), naive, rel_tol=1e-12)
    va, ba = v.clone().requires_grad_(), b.clone().requires_grad_()
    (F.cross_entropy(z @ va.T + ba, y) + 0.5 * (l2 * va * va).sum()).backward()
    assert torch.allclose(dv, va.grad, atol=1e-12) and torch.allclose(db, ba.grad, atol=1e-12)


def test_whitened_fit_reaches_the_same_optimum_as_on_standardised_features():
    """The whitened basis is a change of variables with the L2 term carried over: fitted to
    convergence, both give one weight on the standardised features and the same logits."""
    x, y = correlated(300, 8, seed=4)
    x = x.double()
    fits = {}
    for whiten in (False, True):
        basis = ProbeBasis.of(x, whiten)
        v, b = fit_logistic(basis.z(x), y, 3, 1e-2 * basis.penalty, max_iter=2000, rtol=0.0)
        w = v if basis.rot is None else v @ basis.rot.T
        fits[whiten] = (w, b, basis.z(x) @ v.T + b)
    assert torch.allclose(fits[True][0], fits[False][0], atol=1e-3)  # weights ~1
    assert torch.allclose(fits[True][2], fits[False][2], atol=1e-3)


@pytest.mark.parametrize("whiten", [False, True])
def test_basis_carry_keeps_every_logit(whiten):
    """The refit starts from the held-out fit carried to the all-train basis: the same logits
    for any input, whatever the two bases' means, scales and rotations."""
    x, _ = correlated(200, 5, seed=5)
    x = x.double()
    part, whole = ProbeBasis.of(x[:120], whiten), ProbeBasis.of(x, whiten)
    v = torch.randn(3, 5, generator=gen(6), dtype=torch.float64)
    b = torch.randn(3, generator=gen(7), dtype=torch.float64)
    v2, b2 = part.carry(v, b, to=whole)
    probe = torch.randn(50, 5, generator=gen(8), dtype=torch.float64) * 3
    assert torch.allclose(part.z(probe) @ v.T + b, whole.z(probe) @ v2.T + b2, atol=1e-9)


def test_probe_reaches_full_accuracy_on_linearly_separable_features():
    train_x, train_y = blobs(150, 3, 10, 0.5, seed=0)
    test_x, test_y = blobs(60, 3, 10, 0.5, seed=1)
    result = linear_probe(
        train_x, train_y, test_x, test_y, 3, weight_decays=(1e-4, 1e-2), max_iter=50
    )
    assert result.top1 >= 0.99 and result.val_top1 >= 0.99
    assert result.weight_decay in (1e-4, 1e-2)


def test_probe_never_uses_test_labels_or_features_to_choose_the_weight_decay():
    train_x, train_y = blobs(120, 4, 30, 4.0, seed=2)  # noisy: the choice matters
    test_x, test_y = blobs(80, 4, 30, 4.0, seed=3)
    wds = (1e-5, 1e-3, 1e-1, 1.0)
    ref = linear_probe(train_x, train_y, test_x, test_y, 4, weight_decays=wds, max_iter=40)
    for seed in range(2):
        shuffled = test_y[torch.randperm(len(test_y), generator=gen(seed))]
        other = linear_probe(train_x, train_y, test_x, shuffled, 4, weight_decays=wds, max_iter=40)
        assert (other.weight_decay, other.val_top1) == (ref.weight_decay, ref.val_top1)
    noise = torch.randn_like(test_x) * 100
    other = linear_probe(train_x, train_y, noise, test_y, 4, weight_decays=wds, max_iter=40)
    assert (other.weight_decay, other.val_top1) == (ref.weight_decay, ref.val_top1)
    # The test labels do score the final model.
    assert (
        linear_probe(
            train_x, train_y, test_x, (test_y + 1) % 4, 4, weight_decays=wds, max_iter=40
        ).top1
        != ref.top1
    )


@pytest.mark.parametrize("num_classes,has_top5", [(10, False), (11, True)])
def test_top5_is_reported_only_with_more_than_ten_classes(num_classes, has_top5):
    train_x, train_y = blobs(110, num_classes, 12, 2.0, seed=4)
    test_x, test_y = blobs(55, num_classes, 12, 2.0, seed=5)
    result = linear_probe(
        train_x, train_y, test_x, test_y, num_classes, weight_decays=(1e-3,), max_iter=20
    )
    assert (result.top5 is not None) == has_top5
    if has_top5:
        assert result.top1 <= result.top5 <= 1.0
    metrics = evaluate_features(
        train_x,
        train_y,
        test_x,
        test_y,
        num_classes,
        knn_ks=[20, 5],
        knn_temperature=0.1,
        probe={"weight_decays": [1e-3], "max_iter": 20},
        seed=0,
    )
    expected = {"knn_k20", "knn_k5", "linear_top1", "probe_weight_decay"} | (
        {"linear_top5"} if has_top5 else set()
    )
    assert set(metrics) == expected
    assert all(0.0 <= metrics[k] <= 1.0 for k in expected - {"probe_weight_decay"})


# --------------------------------------------------------------------------- features
def test_extract_features_uses_eval_mode_and_restores_the_mode():
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten())
    encoder(torch.randn(16, 1, 5, 5))  # non-trivial running stats
    images = torch.randint(0, 256, (10, 1, 5, 5), dtype=torch.uint8, generator=gen(0))
    transform = lambda x: x.float() / 255  # noqa: E731
    feats = extract_features(encoder, images, transform, torch.device("cpu"), batch_size=3)
    assert encoder.training  # mode restored
    with torch.no_grad():
        expected = encoder.eval()(transform(images))
    assert feats.dtype == torch.float32 and feats.shape == (10, 36)
    assert torch.allclose(feats, expected, atol=1e-6)


def test_pixel_features_are_flattened_pixels_in_unit_range():
    images = torch.tensor([[[[0, 255], [51, 102]]]], dtype=torch.uint8)
    assert torch.allclose(pixel_features(images), torch.tensor([[0.0, 1.0, 0.2, 0.4]]))


def test_knn_monitor_bank_and_queries_are_disjoint_parts_of_train():
    n = 200
    images = torch.arange(n).view(n, 1, 1, 1).to(torch.uint8)  # pixel value = index
    labels = torch.arange(n) % 5
    monitor = KnnMonitor(
        images,
        labels,
        5,
        lambda x: x.float(),
        torch.device("cpu"),
        bank_size=100,
        query_size=30,
        k=5,
        temperature=0.1,
        seed=0,
    )
    bank = set(monitor.bank_images.flatten().tolist())
    queries = set(monitor.query_images.flatten().tolist())
    assert len(bank) == 100 and len(queries) == 30 and not bank & queries
    assert torch.equal(monitor.bank_labels, monitor.bank_images.flatten().long() % 5)

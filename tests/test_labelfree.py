"""Label-free metrics (RankMe, alignment, uniformity), retrieval and low-shot probes against
naive implementations of the papers' formulas; a collapsed encoder reads as collapsed."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from contrastive_cli.callbacks.monitor import Monitor
from contrastive_cli.data.augment import Augment
from contrastive_cli.evaluators import build_evaluators, evaluate_protocol
from contrastive_cli.evaluators.base import Features
from contrastive_cli.evaluators.lowshot import lowshot_key, stratified_draw
from contrastive_cli.evaluators.retrieval import retrieval_metrics
from contrastive_cli.labelfree import (
    LabelFreeMonitor,
    LabelFreeSample,
    alignment,
    rankme,
    uniformity,
)

SETTINGS = {
    "knn_k": [5],
    "knn_temperature": 0.1,
    "probe": {"weight_decays": [1e-3], "val_fraction": 0.2, "max_iter": 20},
    "lowshot": [0.1, 0.5],
    "lowshot_draws": 3,
    "retrieval_queries": None,
}


def naive_rankme(z: np.ndarray) -> float:
    """Garrido et al. 2023, eq. 1, written out: p_k = s_k / ||s||_1 + 1e-7."""
    s = np.linalg.svd(z.astype(np.float64), compute_uv=False)
    total = sum(abs(v) for v in s)
    entropy = 0.0
    for v in s:
        p = v / total + 1e-7
        entropy -= p * math.log(p)
    return math.exp(entropy)


def unit(v: np.ndarray) -> np.ndarray:
    v = [float(c) for c in v]
    norm = math.sqrt(sum(c * c for c in v))
    return np.array([c / norm for c in v])


def naive_alignment(a: np.ndarray, b: np.ndarray) -> float:
    total = 0.0
    for x, y in zip(a, b, strict=True):
        x, y = unit(x), unit(y)
        total += sum((float(p) - float(q)) ** 2 for p, q in zip(x, y, strict=True))
    return total / len(a)


def naive_uniformity(z: np.ndarray, t: float = 2.0) -> float:
    f = [unit(v) for v in z]
    potentials = []
    for i in range(len(f)):
        for j in range(i + 1, len(f)):
            sq = sum((float(p) - float(q)) ** 2 for p, q in zip(f[i], f[j], strict=True))
            potentials.append(math.exp(-t * sq))
    return math.log(sum(potentials) / len(potentials))


def test_rankme_alignment_uniformity_equal_the_papers_formulas():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(40, 6, generator=g) @ torch.diag(torch.tensor([5.0, 3, 1, 0.5, 0.1, 0.01]))
    w = z + 0.3 * torch.randn(40, 6, generator=g)
    assert rankme(z) == pytest.approx(naive_rankme(z.numpy()), rel=1e-9)
    assert alignment(z, w) == pytest.approx(naive_alignment(z.numpy(), w.numpy()), rel=1e-9)
    assert uniformity(z) == pytest.approx(naive_uniformity(z.numpy()), rel=1e-9)
    # the scale: a full-rank isotropic cloud ranks near its dimension, a rank-2 one near 2
    assert rankme(torch.randn(2000, 8, generator=g)) > 7.5
    assert 1.5 < rankme(torch.randn(200, 2, generator=g) @ torch.randn(2, 8, generator=g)) <= 2


def digits(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, 8, 8), generator=g, dtype=torch.uint8)


class Constant(nn.Module):
    """A collapsed encoder: the same output whatever the input."""

    def __init__(self):
        super().__init__()
        self.out = nn.Parameter(torch.tensor([0.3, -1.2, 0.5, 2.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out.expand(len(x), -1)


def augment() -> Augment:
    return Augment(mean=[0.5], std=[0.25], jitter_p=0.0, grayscale_p=0.0)


def test_a_collapsed_encoder_reads_as_collapsed_and_pixels_do_not():
    sample = LabelFreeSample.of(digits(64), augment(), size=50)
    results = evaluate_protocol(
        {"trained": Constant()},
        None,
        None,
        None,
        None,
        0,
        augment().normalize,
        torch.device("cpu"),
        build_evaluators(["knn", "rankme", "alignment", "uniformity"], SETTINGS, seed=0),
        batch_size=16,
        sample=sample,
        projectors={"trained": nn.Linear(4, 3)},
    )
    collapsed = results["trained"]
    assert collapsed["rankme"] == pytest.approx(1.0, abs=1e-4)
    assert collapsed["rankme_projector"] == pytest.approx(1.0, abs=1e-4)
    assert collapsed["alignment"] == pytest.approx(0.0, abs=1e-12)
    assert collapsed["uniformity"] == pytest.approx(0.0, abs=1e-12)
    assert "knn_k5" not in collapsed  # no labels: the label-free metrics only
    pixels = results["raw_pixels"]
    assert pixels["rankme"] > 10 and pixels["alignment"] > 0.01 and pixels["uniformity"] < -0.1
    # the pixel views are the augmented images in [0, 1]: equal to pixel_features of the
    # images where the augmentation is the identity
    still = Augment(
        mean=[0.5],
        std=[0.25],
        crop_scale=(1.0, 1.0),
        crop_ratio=(1.0, 1.0),
        hflip=0.0,
        jitter_p=0.0,
        grayscale_p=0.0,
    )
    same = LabelFreeSample.of(digits(64), still, size=50)
    flat = same.images.flatten(1).float() / 255
    assert torch.allclose(same.pixels(same.views[0]), flat, atol=1e-5)


def test_the_sample_is_fixed_whatever_the_run_seed():
    a = LabelFreeSample.of(digits(300), augment(), size=100)
    b = LabelFreeSample.of(digits(300), augment(), size=100)
    assert torch.equal(a.images, b.images) and torch.equal(a.views[1], b.views[1])
    assert len(a.images) == 100 and not torch.equal(a.views[0], a.views[1])
    assert len(LabelFreeSample.of(digits(30), augment(), size=100).images) == 30


def test_the_monitor_adds_the_label_free_metrics_to_the_epoch_record():
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(64, 5))
    monitor = LabelFreeMonitor(digits(80), augment(), 64, torch.device("cpu"), batch_size=32)

    class Loop:
        class progress:
            epoch = 2

        epochs = 4
        method = nn.Module()

    Loop.method.encoder, Loop.method.projector = encoder, nn.Linear(5, 3)
    record: dict = {}
    Monitor(None, every=2, labelfree=monitor).epoch_end(Loop, record)  # type: ignore[arg-type]
    assert set(record) == {"rankme", "rankme_projector", "alignment", "uniformity"}
    assert 1 <= record["rankme_projector"] <= 3 and 1 <= record["rankme"] <= 5


def naive_retrieval(bank, bank_y, queries, query_y):
    """Loops over queries and the ranked database: Recall@k and MAP@R (Musgrave et al.)."""
    bank = [unit(v) for v in bank.numpy()]
    recall = {1: 0.0, 5: 0.0}
    ap_total = 0.0
    for q, y in zip(queries.numpy(), query_y.tolist(), strict=True):
        q = unit(q)
        sims = [sum(float(a) * float(b) for a, b in zip(q, v, strict=True)) for v in bank]
        order = sorted(range(len(bank)), key=lambda i: -sims[i])
        relevant = [int(bank_y[i]) == y for i in order]
        for k in recall:
            recall[k] += any(relevant[:k])
        r = sum(int(label) == y for label in bank_y.tolist())
        found, ap = 0, 0.0
        for i in range(r):
            if relevant[i]:
                found += 1
                ap += found / (i + 1)
        ap_total += ap / r
    n = len(queries)
    return {"recall_at_1": recall[1] / n, "recall_at_5": recall[5] / n, "map_at_r": ap_total / n}


def test_retrieval_equals_naive_loops():
    g = torch.Generator().manual_seed(3)
    bank_y = torch.arange(60) % 4
    bank = torch.randn(60, 5, generator=g) + bank_y[:, None].float()
    query_y = torch.arange(25) % 4
    queries = torch.randn(25, 5, generator=g) + query_y[:, None].float()
    got = retrieval_metrics(bank, bank_y, queries, query_y, chunk=7)
    want = naive_retrieval(bank, bank_y, queries, query_y)
    assert got == pytest.approx(want, abs=1e-6)
    assert 0 < got["map_at_r"] < got["recall_at_1"] < 1


def test_lowshot_draws_are_stratified_fixed_by_seed_and_from_train_only(monkeypatch):
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 5)
    idx = stratified_draw(labels, 0.1, seed=0, draw=0)
    assert torch.bincount(labels[idx]).tolist() == [5, 3, 1]  # round(10%), at least one
    assert torch.equal(idx, stratified_draw(labels, 0.1, seed=0, draw=0))
    assert not torch.equal(idx, stratified_draw(labels, 0.1, seed=0, draw=1))
    assert not torch.equal(idx, stratified_draw(labels, 0.1, seed=1, draw=0))
    assert lowshot_key(0.01) == "lowshot_1pct" and lowshot_key(0.005) == "lowshot_0.5pct"
    # every probe fits on train rows only; the test split is only predicted
    import contrastive_cli.evaluators.lowshot as lowshot

    seen = []
    real = lowshot.linear_probe

    def spy(train_x, train_y, test_x, test_y, *args, **kwargs):
        seen.append(train_x)
        return real(train_x, train_y, test_x, test_y, *args, **kwargs)

    monkeypatch.setattr(lowshot, "linear_probe", spy)
    g = torch.Generator().manual_seed(0)
    train_x = torch.randn(85, 3, generator=g) + labels[:, None].float() * 3
    test_x = torch.randn(20, 3, generator=g) + 1000  # far from every train row
    [evaluator] = build_evaluators(["lowshot"], SETTINGS, seed=0)
    metrics = evaluator(Features(train_x, labels, test_x, torch.arange(20) % 3, 3))
    assert set(metrics) == {
        "lowshot_10pct",
        "lowshot_10pct_std",
        "lowshot_50pct",
        "lowshot_50pct_std",
    }
    assert len(seen) == 6 and all(float(x.abs().max()) < 100 for x in seen)
    assert [len(x) for x in seen[:3]] == [9, 9, 9] and metrics["lowshot_50pct_std"] >= 0


def test_the_sample_of_the_test_split_reuses_its_features_and_equals_a_pass_of_its_own():
    images, labels = digits(120), torch.arange(120) % 3
    sample = LabelFreeSample.of(images, augment(), size=40)
    assert sample.of_split(images) and not sample.of_split(digits(120))
    encoder = nn.Sequential(nn.Flatten(), nn.Linear(64, 6))
    seen = []
    encoder.register_forward_hook(lambda module, x, out: seen.append(len(out)))
    run = evaluate_protocol(
        {"trained": encoder},
        digits(90, seed=1),
        torch.arange(90) % 3,
        images,
        labels,
        3,
        augment().normalize,
        torch.device("cpu"),
        build_evaluators(["knn", "rankme", "uniformity"], SETTINGS, seed=0),
        batch_size=32,
        pixels=False,
        sample=sample,
    )["trained"]
    assert sum(seen) == 90 + 120 + 2 * 40  # train, test, the two views: no pass over the sample
    with torch.no_grad():
        own = encoder(augment().normalize(sample.images))  # a pass over the sample itself
    assert run["rankme"] == pytest.approx(rankme(own), rel=1e-5)
    assert run["uniformity"] == pytest.approx(uniformity(own), rel=1e-5)


def test_lowshot_probes_use_their_grid_and_warm_start_each_draw_from_the_last(monkeypatch):
    import contrastive_cli.evaluators.lowshot as lowshot
    from contrastive_cli.evaluate import linear_probe

    calls = []

    def spy(*args, **kwargs):
        result = linear_probe(*args, **kwargs)
        calls.append((kwargs["weight_decays"], kwargs["start"], result, kwargs["whiten"]))
        return result

    monkeypatch.setattr(lowshot, "linear_probe", spy)
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(300) % 3
    train_x = torch.randn(300, 4, generator=g) + labels[:, None].float()
    settings = SETTINGS | {"lowshot": [0.2], "lowshot_weight_decays": [0.05, 0.005]}
    [evaluator] = build_evaluators(["lowshot"], settings, seed=0)
    test_y = torch.arange(60) % 3
    test_x = torch.randn(60, 4, generator=g) + test_y[:, None].float()
    evaluator(Features(train_x, labels, test_x, test_y, 3))
    assert [c[0] for c in calls] == [[0.05, 0.005]] * 3
    assert calls[0][1] is None
    assert calls[1][1] is calls[0][2].first and calls[2][1] is calls[1][2].first
    # 60 images of 4 features: whitened; 15 (fewer than 10 per feature): standardised
    assert [c[3] for c in calls] == [True] * 3
    build_evaluators(["lowshot"], settings | {"lowshot": [0.05]}, 0)[0](
        Features(train_x, labels, test_x, test_y, 3)
    )
    assert [c[3] for c in calls[3:]] == [False] * 3
    # the warm start moves where L-BFGS starts, not the optimum it reaches
    idx = lowshot.stratified_draw(labels, 0.2, seed=0, draw=1)
    args = (train_x[idx], labels[idx], test_x, test_y, 3)
    probe = {"weight_decays": [0.05, 0.005], "max_iter": 200}
    cold = linear_probe(*args, **probe)
    warm = linear_probe(*args, **probe, start=calls[0][2].first)
    assert warm.weight_decay == cold.weight_decay and warm.top1 == pytest.approx(
        cold.top1, abs=2 / 60
    )
    assert lowshot.make({"probe": SETTINGS["probe"]}, 0).probe["weight_decays"] == [
        1e-4,
        1e-3,
        1e-2,
    ]


def byol_labelfree(*overrides: str) -> dict[str, float]:
    """A few hundred steps of BYOL on digits (small MLP, high lr), then the label-free metrics
    as the training monitor computes them (the encoder, and the projector for rankme)."""
    from contrastive_cli.builder import build_run, train_steps
    from contrastive_cli.config import compose
    from contrastive_cli.labelfree import projector_of

    cfg = compose(
        [
            "data=digits",
            "loss=byol",
            "device=cpu",
            "encoder=mlp",
            "encoder.hidden_dims=[256]",
            "loss.projector.hidden_dim=256",
            "loss.projector.out_dim=64",
            "optim.lr=3e-2",
            "trainer.epochs=20",
            "eval.every=0",
            *overrides,
        ]
    )
    built = build_run(cfg)
    train_steps(built, 100, 20, 0)
    method = built.training.method
    monitor = LabelFreeMonitor(built.data.test.images, built.augment, 256, torch.device("cpu"))
    return monitor(method.encoder, projector_of(method))


def test_byol_without_its_predictor_reads_as_collapsed_next_to_byol_with_it():
    """Grill et al. 2020 (Table 5b): without the predictor BYOL collapses. In 100 steps the
    collapse is in the projection (what the loss sees): its RankMe falls to a few of its 64
    dimensions, about a third of BYOL's with the predictor (seeds 0 and 1: 6.6 vs 20.3 and
    16.5); the encoder's features below keep most of their rank at this budget."""
    with_predictor = byol_labelfree()
    without = byol_labelfree("loss.predictor=null")
    assert without["rankme_projector"] < 10 < with_predictor["rankme_projector"]
    assert without["rankme_projector"] < 0.5 * with_predictor["rankme_projector"]


def test_saved_projector_is_the_checkpoints_when_it_holds_the_encoders_state(tmp_path, caplog):
    from contrastive_cli.checkpoint import FORMAT, save_checkpoint
    from contrastive_cli.config import build, compose
    from contrastive_cli.labelfree import saved_projector
    from contrastive_cli.parts import build_encoder

    cfg = compose(["data=digits", "encoder=mlp", "encoder.hidden_dims=[32]", "loss=ntxent"])
    assert saved_projector(cfg.loss, tmp_path, build_encoder(cfg, 0)) is None  # none kept
    method = build(cfg.loss, encoder=build_encoder(cfg, 0))
    with torch.no_grad():
        for p in method.parameters():  # trained: neither encoder nor projector as built
            p.add_(torch.randn_like(p))
    state = {k: v.clone() for k, v in method.state_dict().items()}
    save_checkpoint(tmp_path / "checkpoints" / "last.pt", {"format": FORMAT, "method": state})
    projector = saved_projector(cfg.loss, tmp_path, method.encoder)
    x = torch.randn(5, method.encoder.eval()(torch.zeros(2, 1, 8, 8)).shape[1])
    assert torch.equal(projector.eval()(x), method.projector.eval()(x))
    # a checkpoint of another state than the saved encoder's: not used, said so
    assert saved_projector(cfg.loss, tmp_path, build_encoder(cfg, 0)) is None
    assert "is not the state the encoder was saved in" in caplog.text

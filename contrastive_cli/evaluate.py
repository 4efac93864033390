"""The frozen-encoder evaluation protocol: k-NN and a linear probe on cached features.

- Features: encoder output (before any projector), encoder in eval(), no augmentation.
- k-NN: cosine similarity of L2-normalised features, the top-k train neighbours vote with
  weight exp(sim / T). One top-max(k) pass serves every k.
- Linear probe: multinomial logistic regression on standardised features, trained in torch
  with L-BFGS; its L2 weight decay is chosen on a held-out part of the train split, then
  refit on the whole train split. The test split never chooses anything.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from contrastive_cli.data.batches import derive_seed

log = logging.getLogger(__name__)


@torch.no_grad()
def extract_features(
    encoder: nn.Module,
    images: Tensor,
    transform: Callable[[Tensor], Tensor],
    device: torch.device,
    batch_size: int = 1024,
    channels_last: bool = False,
    autocast: bool = False,
) -> Tensor:
    """(N, C, H, W) uint8 -> (N, D) float32 features on ``device``; the encoder's mode is kept.

    ``images`` is a tensor, or image files (``ImageFiles``) that decode batch by batch.
    """
    was_training = encoder.training
    encoder.eval()
    out = []
    try:
        for chunk in images.split(batch_size):
            x = transform(chunk.to(device, non_blocking=True))
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            ctx = (
                torch.autocast(device.type, dtype=torch.bfloat16)
                if autocast
                else contextlib.nullcontext()
            )
            with ctx:
                out.append(encoder(x).float())
    finally:
        encoder.train(was_training)
    return torch.cat(out)


def pixel_features(images: Tensor) -> Tensor:
    """The raw-pixel baseline's features: pixels in [0, 1], flattened."""
    return images.flatten(1).float().div_(255)


@torch.no_grad()
def knn_predict(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    num_classes: int,
    ks: Sequence[int] = (200, 20),
    temperature: float = 0.1,
    chunk_size: int = 1024,
) -> dict[int, Tensor]:
    """Weighted k-NN predictions for each k in ``ks``.

    Args:
        train_feats: (N, D) bank features; train_labels: (N,) int64.
        test_feats: (M, D) query features.
    Returns {k: (M,) predicted labels}. A k larger than N is clamped to N.
    """
    bank = F.normalize(train_feats.float(), dim=1)
    queries = F.normalize(test_feats.float(), dim=1)
    k_max = min(max(ks), bank.shape[0])
    preds: dict[int, list[Tensor]] = {k: [] for k in ks}
    for start in range(0, queries.shape[0], chunk_size):
        sim = queries[start : start + chunk_size] @ bank.T  # (m, N)
        top_sim, top_idx = sim.topk(k_max, dim=1)  # sorted, (m, k_max)
        weights = (top_sim / temperature).exp()
        neighbour_labels = train_labels[top_idx]  # (m, k_max)
        for k in ks:
            k_eff = min(k, k_max)
            votes = torch.zeros(sim.shape[0], num_classes, device=sim.device, dtype=weights.dtype)
            votes.scatter_add_(1, neighbour_labels[:, :k_eff], weights[:, :k_eff])
            preds[k].append(votes.argmax(1))
    return {k: torch.cat(p) for k, p in preds.items()}


def accuracy(pred: Tensor, labels: Tensor) -> float:
    return (pred == labels).float().mean().item()


@dataclass(frozen=True)
class ProbeResult:
    top1: float
    top5: float | None
    weight_decay: float
    val_top1: float


def _standardise(fit: Tensor, *others: Tensor) -> list[Tensor]:
    mean, std = _moments(fit)
    return [(t - mean) / std for t in (fit, *others)]


def _moments(x: Tensor) -> tuple[Tensor, Tensor]:
    return x.mean(0, keepdim=True), x.std(0, keepdim=True).clamp_min(1e-6)


# L-BFGS runs in rounds of this many iterations; a fit stops early when a round lowered the
# objective by less than PROBE_RTOL of its value (or after max_iter iterations). On Fashion-MNIST
# features (random-init cnn, trained cnn, raw pixels) 1e-3 needs 2.5-4x fewer evaluations than
# running every fit to max_iter=200, and test accuracy moved by at most 0.12% (its standard
# error there is 0.35%).
PROBE_ROUND = 10
PROBE_RTOL = 1e-3


def fit_logistic(
    x: Tensor,
    y: Tensor,
    num_classes: int,
    weight_decay: float,
    max_iter: int = 200,
    init: tuple[Tensor, Tensor] | None = None,
    rtol: float = PROBE_RTOL,
) -> tuple[Tensor, Tensor]:
    """Minimise mean cross-entropy + weight_decay/2 * ||W||^2 with full-batch L-BFGS.

    Returns W (K, D) and b (K,). W is stored as nn.Linear stores it, so its gradient is
    ``g.T @ x``; a (D, K) weight gets ``x.T @ g``, a transposed skinny GEMM that CPU BLAS
    runs several times slower on (N, D) features (``make bench``'s probe timings).

    The fit stops once a round of ``PROBE_ROUND`` iterations improves the objective by less
    than ``rtol`` of its value: warm-started fits near their optimum then take one or two
    rounds instead of ``max_iter`` iterations. A round rather than one iteration, because
    L-BFGS's first steps from a warm start are short and would stop it too early.
    """
    w = (init[0].clone() if init else x.new_zeros(num_classes, x.shape[1])).requires_grad_(True)
    b = (init[1].clone() if init else x.new_zeros(num_classes)).requires_grad_(True)
    opt = torch.optim.LBFGS(
        [w, b],
        lr=1.0,
        max_iter=PROBE_ROUND,
        max_eval=2 * PROBE_ROUND,
        history_size=20,
        tolerance_grad=1e-6,
        tolerance_change=1e-9,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(F.linear(x, w, b), y) + 0.5 * weight_decay * (w * w).sum()
        loss.backward()
        return loss.detach()

    previous = math.inf
    with torch.enable_grad():
        for done in range(0, max_iter, PROBE_ROUND):
            opt.param_groups[0]["max_iter"] = min(PROBE_ROUND, max_iter - done)
            start = float(opt.step(closure))  # the objective where this round started
            if previous - start <= rtol * abs(start):
                break  # the previous round barely helped
            previous = start
    return w.detach(), b.detach()


def linear_probe(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    num_classes: int,
    weight_decays: Sequence[float] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2),
    val_fraction: float = 0.1,
    seed: int = 0,
    max_iter: int = 200,
) -> ProbeResult:
    """Choose the weight decay on a held-out part of train, refit on all of train, test once.

    Each fit is warm-started: the grid from strong to weak decay, and the refit from the
    chosen held-out fit, carried over exactly to the all-train standardisation (the same
    logits for every input), so the refit starts near its optimum.
    """
    g = torch.Generator().manual_seed(derive_seed(seed, "probe-split"))
    order = torch.randperm(len(train_x), generator=g).to(train_x.device)
    n_val = max(1, round(len(train_x) * val_fraction))
    val_idx, fit_idx = order[:n_val], order[n_val:]
    fit_mean, fit_std = _moments(train_x[fit_idx].float())
    fit_x, val_x = ((train_x[i].float() - fit_mean) / fit_std for i in (fit_idx, val_idx))
    best: tuple[float, float, tuple[Tensor, Tensor]] | None = None
    params = None
    for wd in sorted(weight_decays, reverse=True):  # strong to weak, warm-started
        params = fit_logistic(fit_x, train_y[fit_idx], num_classes, wd, max_iter, init=params)
        val_acc = accuracy(F.linear(val_x, *params).argmax(1), train_y[val_idx])
        if best is None or val_acc > best[1]:
            best = (wd, val_acc, params)
    assert best is not None
    del fit_x, val_x
    mean, std = _moments(train_x.float())
    all_x, tst_x = (train_x.float() - mean) / std, (test_x.float() - mean) / std
    # (x - m1) / s1 = z * s / s1 + (m - m1) / s1 with z = (x - m) / s: rescale W, shift b.
    w_fit, b_fit = best[2]
    init = (w_fit * (std / fit_std), b_fit + w_fit @ ((mean - fit_mean) / fit_std).squeeze(0))
    w, b = fit_logistic(all_x, train_y, num_classes, best[0], max_iter, init=init)
    logits = F.linear(tst_x, w, b)
    top5 = None
    if num_classes > 10:
        top5 = (logits.topk(5, dim=1).indices == test_y[:, None]).any(1).float().mean().item()
    return ProbeResult(accuracy(logits.argmax(1), test_y), top5, best[0], best[1])


def evaluate_features(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    num_classes: int,
    knn_ks: Sequence[int],
    knn_temperature: float,
    probe: dict,
    seed: int,
) -> dict[str, float]:
    """k-NN for every k and the linear probe on one set of features -> flat metrics dict."""
    metrics: dict[str, float] = {}
    preds = knn_predict(train_x, train_y, test_x, num_classes, knn_ks, knn_temperature)
    for k, p in preds.items():
        metrics[f"knn_k{k}"] = accuracy(p, test_y)
    result = linear_probe(train_x, train_y, test_x, test_y, num_classes, seed=seed, **probe)
    metrics["linear_top1"] = result.top1
    if result.top5 is not None:
        metrics["linear_top5"] = result.top5
    metrics["probe_weight_decay"] = result.weight_decay
    return metrics


class KnnMonitor:
    """k-NN accuracy during training, on a held-out part of the train split.

    The bank and the queries are disjoint subsets of the labelled train split, fixed by the
    seed; the test split is left alone so the curves cannot steer any choice toward it.
    """

    def __init__(
        self,
        images: Tensor,
        labels: Tensor,
        num_classes: int,
        transform: Callable[[Tensor], Tensor],
        device: torch.device,
        bank_size: int,
        query_size: int,
        k: int,
        temperature: float,
        seed: int,
        batch_size: int = 1024,
        channels_last: bool = False,
        autocast: bool = False,
    ):
        g = torch.Generator().manual_seed(derive_seed(seed, "monitor"))
        order = torch.randperm(len(images), generator=g)
        n_query = max(1, min(query_size, len(images) // 5))
        query_idx, bank_idx = order[:n_query], order[n_query : n_query + bank_size]
        self.bank_images, self.bank_labels = images[bank_idx], labels[bank_idx].to(device)
        self.query_images, self.query_labels = images[query_idx], labels[query_idx].to(device)
        self.num_classes, self.transform, self.device = num_classes, transform, device
        self.k, self.temperature, self.batch_size = k, temperature, batch_size
        self.channels_last, self.autocast = channels_last, autocast

    def __call__(self, encoder: nn.Module) -> float:
        def features(images: Tensor) -> Tensor:
            return extract_features(
                encoder,
                images,
                self.transform,
                self.device,
                self.batch_size,
                self.channels_last,
                self.autocast,
            )

        pred = knn_predict(
            features(self.bank_images),
            self.bank_labels,
            features(self.query_images),
            self.num_classes,
            (self.k,),
            self.temperature,
        )[self.k]
        return accuracy(pred, self.query_labels)


def evaluate_protocol(
    encoders: dict[str, nn.Module],
    train_images: Tensor,
    train_labels: Tensor,
    test_images: Tensor,
    test_labels: Tensor,
    num_classes: int,
    transform: Callable[[Tensor], Tensor],
    device: torch.device,
    eval_cfg: dict,
    seed: int,
    pixels: bool = True,
    channels_last: bool = False,
    autocast: bool = False,
) -> dict[str, dict[str, float]]:
    """Every encoder in ``encoders`` (and raw pixels) through the same k-NN and probe.

    Returns {name: metrics}; raw pixels appear as ``raw_pixels``. Each metrics dict also
    holds ``seconds``: feature extraction plus k-NN plus probe for that entry.
    """
    import time

    train_y, test_y = train_labels.to(device), test_labels.to(device)
    common = dict(
        knn_ks=list(eval_cfg["knn_k"]),
        knn_temperature=eval_cfg["knn_temperature"],
        probe=dict(eval_cfg["probe"]),
        seed=seed,
    )
    sources: dict[str, Callable[[Tensor], Tensor]] = {}
    if pixels:
        sources["raw_pixels"] = lambda images: torch.cat(
            [pixel_features(chunk.to(device)) for chunk in images.split(eval_cfg["batch_size"])]
        )
    for name, encoder in encoders.items():
        sources[name] = lambda images, enc=encoder: extract_features(
            enc, images, transform, device, eval_cfg["batch_size"], channels_last, autocast
        )
    results = {}
    for name, features in sources.items():
        start = time.perf_counter()
        metrics = evaluate_features(
            features(train_images), train_y, features(test_images), test_y, num_classes, **common
        )
        metrics["seconds"] = time.perf_counter() - start
        results[name] = metrics
    return results

"""The frozen-encoder evaluation protocol: k-NN and a linear probe on cached features.

- Features: encoder output (before any projector), encoder in eval(), no augmentation.
- k-NN: cosine similarity of L2-normalised features, the top-k train neighbours vote with
  weight exp(sim / T) (computed as exp((sim - best) / T), best the query's highest
  similarity: same votes, no overflow, and the nearest neighbour always weighs 1). One
  top-max(k) pass serves every k.
- Linear probe: multinomial logistic regression on standardised features, trained in torch
  with L-BFGS (in a whitened basis of them: the same objective, better conditioned); its L2
  weight decay is chosen on a held-out part of the train split, then refit on the whole
  train split. The test split never chooses anything.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from contrastive_cli.data.batches import derive_seed
from contrastive_cli.progress import Task

log = logging.getLogger(__name__)

# The baseline cache (contrastive_cli.baselines) keys on this: bump it with any change here that
# changes a number the protocol returns.
PROTOCOL_VERSION = 2  # 2: low-shot grid eval.lowshot_weight_decays, warm-started draws


def extract_features(
    encoder: nn.Module,
    images: Tensor,
    transform: Callable[[Tensor], Tensor],
    device: torch.device,
    batch_size: int = 1024,
    channels_last: bool = False,
    autocast: bool = False,
    desc: str | None = None,
) -> Tensor:
    """(N, C, H, W) uint8 -> (N, D) float32 features on ``device``; the encoder's mode is kept.

    ``images`` is a tensor, or image files (``ImageFiles``) that decode batch by batch.
    Batches of ``batch_size`` under ``torch.inference_mode`` (no autograd records, no
    version counters), in bf16 autocast where the run trains in it; the features come back
    as ordinary tensors (concatenated outside inference mode), so a probe can train on them.
    ``desc``: show progress under this name (``contrastive_cli.progress``).
    """
    was_training = encoder.training
    encoder.eval()
    out = []
    ctx = (
        (lambda: torch.autocast(device.type, dtype=torch.bfloat16))
        if autocast
        else contextlib.nullcontext
    )
    shown = Task(desc, total=len(images), unit="image") if desc else None
    try:
        with shown or contextlib.nullcontext():
            for chunk in images.split(batch_size):
                with torch.inference_mode(), ctx():
                    x = transform(chunk.to(device, non_blocking=True))
                    if channels_last:
                        x = x.contiguous(memory_format=torch.channels_last)
                    out.append(encoder(x).float())
                if shown is not None:
                    shown.update(len(chunk))
    finally:
        encoder.train(was_training)
    return torch.cat(out)  # outside inference mode: an ordinary tensor


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

    A vote weighs exp((s - best) / T) = exp(s / T) / exp(best / T), best the query's highest
    similarity: the same argmax, but it stays <= 1 where exp(s / T) overflows float32 for
    T < 1 / 88.7, and the nearest neighbour weighs 1 where exp((s - 1) / T) underflowed to 0
    for every neighbour at small T (every query then voted for class 0). The (chunk, N) similarity
    buffer is allocated once: a fresh 245 MB tensor per chunk cost ~30% of the time in
    page faults on CPU.
    """
    bank = F.normalize(train_feats.float(), dim=1)
    queries = F.normalize(test_feats.float(), dim=1)
    k_max = min(max(ks), bank.shape[0])
    preds: dict[int, list[Tensor]] = {k: [] for k in ks}
    buffer = bank.new_empty(min(chunk_size, queries.shape[0]), bank.shape[0])
    for start in range(0, queries.shape[0], chunk_size):
        chunk = queries[start : start + chunk_size]
        sim = torch.mm(chunk, bank.T, out=buffer[: len(chunk)])  # (m, N)
        top_sim, top_idx = sim.topk(k_max, dim=1)  # sorted, (m, k_max)
        weights = top_sim.sub_(top_sim[:, :1].clone()).div_(temperature).exp_()  # best: 1
        neighbour_labels = train_labels[top_idx]  # (m, k_max)
        for k in ks:
            k_eff = min(k, k_max)
            votes = weights.new_zeros(len(chunk), num_classes)
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
    # the grid's first (strongest-decay) held-out fit: (its basis, V, b), for a warm start
    first: tuple[ProbeBasis, Tensor, Tensor] | None = field(default=None, compare=False, repr=False)


def _standardise(fit: Tensor, *others: Tensor) -> list[Tensor]:
    mean, std = _moments(fit)
    return [(t - mean) / std for t in (fit, *others)]


def _moments(x: Tensor) -> tuple[Tensor, Tensor]:
    return x.mean(0, keepdim=True), x.std(0, keepdim=True).clamp_min(1e-6)


# L-BFGS runs in rounds of this many iterations; a fit stops early when a round lowered the
# objective by less than PROBE_RTOL of its value (or after max_iter iterations). Measured on
# Fashion-MNIST (random-init cnn features, raw pixels; 5 held-out fits and the refit each),
# against the same fits run to convergence: every fit ends closer to its optimum than the
# unwhitened probe did with rounds of 10 and 1e-3, with 42% fewer evaluations on cnn features
# (196 vs 336) and 27% fewer on pixels (401 vs 547); test accuracy 0.8351 / 0.8473 against
# 0.8345 / 0.8472 at convergence (standard error 0.36%).
PROBE_ROUND = 5
PROBE_RTOL = 7e-4
# Whitening costs two (N, D) x (D, D) products per basis, growing as D^2: at D = 256 and 784
# they took ~0.2 s and ~2 s against ~2 s and ~10 s of L-BFGS evaluations saved. Above this
# many features (CIFAR pixels: 3,072) the probe runs on standardised features (not measured).
WHITEN_MAX_DIM = 1024


@dataclass(frozen=True)
class ProbeBasis:
    """The coordinates the probe is fitted in: standardised features, rotated and scaled so
    that their covariance is the identity (when D <= WHITEN_MAX_DIM).

    With x_s = (x - mean) / std and its covariance U diag(s) U^T, the probe fits V on
    z = x_s @ rot, rot = U diag(s)^-1/2 (D, D). Its weight on standardised features is
    W = V @ rot.T, so ||W||^2 = sum_j ||V[:, j]||^2 / s_j: ``penalty`` (D,) = 1 / s carries the
    L2 term over exactly. The objective, hence its optimum, is the protocol's; only L-BFGS
    sees a better-conditioned problem (on random-init cnn features the covariance's
    eigenvalues span 0.04 to 43) and needs fewer evaluations.
    """

    mean: Tensor  # (1, D)
    std: Tensor  # (1, D)
    rot: Tensor | None  # (D, D) U diag(s)^-1/2; None: standardised features as they are
    unrot: Tensor | None  # (D, D) rot^-T = U diag(s)^1/2
    penalty: Tensor  # (D,) L2 weight of each column of V per unit of weight decay

    @staticmethod
    def of(x: Tensor, whiten: bool) -> ProbeBasis:
        if not whiten:
            mean, std = _moments(x)
            return ProbeBasis(mean, std, None, None, x.new_ones(x.shape[1]))
        mean = x.mean(0, keepdim=True)
        centred = x - mean
        gram = centred.T @ centred  # (D, D); its diagonal gives the std without another pass
        std = (gram.diagonal() / max(len(x) - 1, 1)).sqrt().clamp_min(1e-6)[None]
        scale = std.T.double() * std.double()
        s, u = torch.linalg.eigh(gram.double() / scale / len(x))  # of the standardised x
        # Null directions (constant or collinear features) keep a finite scale: any invertible
        # map gives the same optimum, this one only conditions the rest.
        s = s.clamp_min(1e-6 * float(s.max().clamp_min(1e-12)))
        rot, unrot = u / s.sqrt(), u * s.sqrt()
        return ProbeBasis(mean, std, rot.to(x.dtype), unrot.to(x.dtype), (1 / s).to(x.dtype))

    def z(self, x: Tensor) -> Tensor:
        """(N, D) features -> (N, D) the probe's inputs: ((x - mean) / std) @ rot, as one
        product with the 1 / std folded into rot's rows."""
        if self.rot is None:
            return (x - self.mean) / self.std
        return (x - self.mean) @ (self.rot / self.std.T)

    def logits(self, x: Tensor, v: Tensor, b: Tensor) -> Tensor:
        """``F.linear(self.z(x), v, b)`` with V folded into the basis first: (N, D) x (D, K)
        instead of (N, D) x (D, D) (the low-shot probes score all of test six times)."""
        w = (v / self.std if self.rot is None else v @ (self.rot / self.std.T).T).T  # (D, K)
        return torch.addmm(b, x - self.mean, w)

    def carry(self, v: Tensor, b: Tensor, to: ProbeBasis) -> tuple[Tensor, Tensor]:
        """(V, b) fitted in this basis -> the (V, b) in ``to`` that gives the same logits for
        every input: (x - m1) / s1 = z2 * s2 / s1 + (m2 - m1) / s1 with z2 = (x - m2) / s2."""
        w = v if self.rot is None else v @ self.rot.T  # on standardised features
        shift = w @ ((to.mean - self.mean) / self.std).squeeze(0)
        w = w * (to.std / self.std)
        return (w if to.unrot is None else w @ to.unrot), b + shift


def logistic_objective(
    z: Tensor, y: Tensor, v: Tensor, b: Tensor, l2: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Mean cross-entropy of softmax(z V^T + b) + 1/2 sum_kj l2_j V_kj^2, and its gradient.

    Args: z (N, D) inputs, y (N,) int64 labels, v (K, D), b (K,), l2 (D,) per-column weight.
    Returns (loss, dV (K, D), db (K,)). Written out rather than through autograd: the logits
    are softmaxed as (K, N), contiguous along N (a softmax over 10 contiguous columns runs
    ~15x slower on CPU), and the gradient (p - onehot)^T z / N is one (K, N) x (N, D) product.
    The log-sum-exp is spelled out too: torch's logsumexp over dim 0 ran 10x slower with two
    threads than one.
    """
    n = z.shape[0]
    logits = torch.addmm(b, z, v.T).T.contiguous()  # (K, N)
    target = logits.gather(0, y[None]).sum()
    top = logits.amax(0)  # (N,)
    p = logits.sub_(top).exp_()  # (K, N) unnormalised softmax
    total = p.sum(0)  # (N,)
    lse = total.log() + top
    loss = (lse.sum() - target) / n + 0.5 * (l2 * v * v).sum()
    p.div_(total).scatter_add_(0, y[None], p.new_full((1, n), -1.0)).div_(n)  # (p - onehot) / N
    return loss, p @ z + l2 * v, p.sum(1)


def fit_logistic(
    z: Tensor,
    y: Tensor,
    num_classes: int,
    l2: Tensor,
    max_iter: int = 200,
    init: tuple[Tensor, Tensor] | None = None,
    rtol: float = PROBE_RTOL,
) -> tuple[Tensor, Tensor]:
    """Minimise ``logistic_objective`` with full-batch L-BFGS -> V (K, D), b (K,).

    The fit stops once a round of ``PROBE_ROUND`` iterations improves the objective by less
    than ``rtol`` of its value: warm-started fits near their optimum then take one or two
    rounds instead of ``max_iter`` iterations. A round rather than one iteration, because
    L-BFGS's first steps from a warm start are short and would stop it too early.
    """
    v = init[0].clone() if init else z.new_zeros(num_classes, z.shape[1])
    b = init[1].clone() if init else z.new_zeros(num_classes)
    opt = torch.optim.LBFGS(
        [v, b],
        lr=1.0,
        max_iter=PROBE_ROUND,
        max_eval=2 * PROBE_ROUND,
        history_size=20,
        tolerance_grad=1e-6,
        tolerance_change=1e-9,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        loss, v.grad, b.grad = logistic_objective(z, y, v, b, l2)
        return loss

    previous = math.inf
    with torch.no_grad():
        for done in range(0, max_iter, PROBE_ROUND):
            opt.param_groups[0]["max_iter"] = min(PROBE_ROUND, max_iter - done)
            start = float(opt.step(closure))  # the objective where this round started
            if previous - start <= rtol * abs(start):
                break  # the previous round barely helped
            previous = start
    return v, b


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
    start: tuple[ProbeBasis, Tensor, Tensor] | None = None,
    whiten: bool | None = None,
) -> ProbeResult:
    """Choose the weight decay on a held-out part of train, refit on all of train, test once.

    The model is multinomial logistic regression on standardised features with an L2 weight
    decay, fitted in a whitened basis of them (``ProbeBasis``: the same objective, better
    conditioned). Each fit is warm-started: the grid from strong to weak decay, and the refit
    from the chosen held-out fit, carried over exactly to the all-train basis (the same
    logits for every input), so the refit starts near its optimum. ``start``: a fit of the
    same features on another sample (another probe's ``first``), carried over likewise into
    the first grid fit's start (the low-shot draws); it changes where L-BFGS starts, not the
    objective. ``whiten``: fit in the whitened basis (None: when D <= WHITEN_MAX_DIM).
    """
    g = torch.Generator().manual_seed(derive_seed(seed, "probe-split"))
    order = torch.randperm(len(train_x), generator=g).to(train_x.device)
    n_val = max(1, round(len(train_x) * val_fraction))
    val_idx, fit_idx = order[:n_val], order[n_val:]
    if whiten is None:
        whiten = train_x.shape[1] <= WHITEN_MAX_DIM
    fit_x = train_x[fit_idx].float()
    fit_basis = ProbeBasis.of(fit_x, whiten)
    fit_z, val_z = fit_basis.z(fit_x), fit_basis.z(train_x[val_idx].float())
    del fit_x
    fit_y, val_y = train_y[fit_idx], train_y[val_idx]
    best: tuple[float, float, tuple[Tensor, Tensor]] | None = None
    params = start[0].carry(start[1], start[2], to=fit_basis) if start is not None else None
    first = None
    with Task("probe fits", total=len(weight_decays) + 1, unit="fit") as fits:
        for wd in sorted(weight_decays, reverse=True):  # strong to weak, warm-started
            fits.note(weight_decay=f"{wd:g}")
            params = fit_logistic(
                fit_z, fit_y, num_classes, wd * fit_basis.penalty, max_iter, init=params
            )
            first = first or (fit_basis, *params)
            val_acc = accuracy(F.linear(val_z, *params).argmax(1), val_y)
            if best is None or val_acc > best[1]:
                best = (wd, val_acc, params)
            fits.update()
        assert best is not None
        del fit_z, val_z
        fits.note(refit=f"weight decay {best[0]:g} on all of train")
        basis = ProbeBasis.of(train_x.float(), whiten)
        init = fit_basis.carry(*best[2], to=basis)
        all_z = basis.z(train_x.float())
        wd = best[0] * basis.penalty
        v, b = fit_logistic(all_z, train_y, num_classes, wd, max_iter, init=init)
        del all_z
    logits = basis.logits(test_x.float(), v, b)
    top5 = None
    if num_classes > 10:
        top5 = (logits.topk(5, dim=1).indices == test_y[:, None]).any(1).float().mean().item()
    return ProbeResult(accuracy(logits.argmax(1), test_y), top5, best[0], best[1], first)


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

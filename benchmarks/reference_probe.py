"""The linear probe as it was before ``make bench`` (commit 4e2ecab), kept to show the
speed-up of ``contrastive_cli.evaluate.linear_probe`` and that its results agree.

Differences in the current version: the weight is (K, D) instead of (D, K), which turns
autograd's ``x.T @ g`` into ``g.T @ x``; the refit on all of train is warm-started from the
chosen held-out fit instead of from zeros; and each fit stops when 10 L-BFGS iterations
improve the objective by less than 1e-3 of its value instead of always running max_iter.
Same objective, weight-decay grid, split and test.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from contrastive_cli.data.batches import derive_seed
from contrastive_cli.evaluate import ProbeResult, _standardise, accuracy


def fit_logistic(
    x: Tensor,
    y: Tensor,
    num_classes: int,
    weight_decay: float,
    max_iter: int = 200,
    init: tuple[Tensor, Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    w = (init[0].clone() if init else x.new_zeros(x.shape[1], num_classes)).requires_grad_(True)
    b = (init[1].clone() if init else x.new_zeros(num_classes)).requires_grad_(True)
    opt = torch.optim.LBFGS(
        [w, b],
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        tolerance_grad=1e-6,
        tolerance_change=1e-9,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(x @ w + b, y) + 0.5 * weight_decay * (w * w).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
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
    g = torch.Generator().manual_seed(derive_seed(seed, "probe-split"))
    order = torch.randperm(len(train_x), generator=g).to(train_x.device)
    n_val = max(1, round(len(train_x) * val_fraction))
    val_idx, fit_idx = order[:n_val], order[n_val:]
    fit_x, val_x = _standardise(train_x[fit_idx].float(), train_x[val_idx].float())
    best: tuple[float, float] | None = None
    params = None
    for wd in sorted(weight_decays, reverse=True):
        params = fit_logistic(fit_x, train_y[fit_idx], num_classes, wd, max_iter, init=params)
        val_acc = accuracy((val_x @ params[0] + params[1]).argmax(1), train_y[val_idx])
        if best is None or val_acc > best[1]:
            best = (wd, val_acc)
    assert best is not None
    all_x, tst_x = _standardise(train_x.float(), test_x.float())
    w, b = fit_logistic(all_x, train_y, num_classes, best[0], max_iter)
    logits = tst_x @ w + b
    top5 = None
    if num_classes > 10:
        top5 = (logits.topk(5, dim=1).indices == test_y[:, None]).any(1).float().mean().item()
    return ProbeResult(accuracy(logits.argmax(1), test_y), top5, best[0], best[1])

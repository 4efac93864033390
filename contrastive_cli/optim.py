"""LARS: SGD with momentum and a layer-wise trust ratio (You, Gitman & Ginsburg, 2017)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from contrastive_cli.schema import Momentum, NonNegative, Positive


class LARS(torch.optim.Optimizer):
    """SGD with momentum whose step for each weight tensor w is rescaled by its trust ratio:

        u   = g + wd * w
        r   = eta * ||w|| / (||g|| + wd * ||w|| + eps)     (1 where ||w|| or ||g|| is 0)
        r   = min(r / lr, 1)                               if clip_lr (LARC's clipping)
        buf = momentum * buf + r * u;   w = w - lr * buf

    The ratio is You et al.'s eq. 6 (and PL Bolts' / solo-learn's). BYOL, SimCLR and the
    Barlow Twins code divide by ||g + wd * w|| instead, which is no larger (equal when g and w
    are parallel or wd = 0), so their ratio is at least ours. With ``clip_lr`` a tensor's step
    is never larger than plain SGD's at the scheduled lr: the ratio only brakes large-gradient
    layers. Biases and normalisation parameters (every tensor with <= 1 dimension) take plain
    SGD with momentum, without weight decay or adaptation, as in BYOL and Barlow Twins
    (``exclude_bias_and_norm=False`` treats them like the weights).

    Defaults are solo-learn's CIFAR Barlow Twins recipe (lr 0.3 at batch 256, wd 1e-4,
    eta 0.02, clip_lr, biases and norms excluded); the papers' ImageNet runs use eta 0.001
    without clipping. The first step's momentum buffer is the first update (as torch SGD).
    Everything stays on the parameters' device: no host sync per step.

    Args:
        params: parameters or parameter groups (as every torch optimizer).
        lr: > 0, the learning rate (the scheduler changes it per group).
        momentum: in [0, 1).
        weight_decay: >= 0, L2 penalty added to the gradient of adapted tensors.
        trust_coefficient: eta > 0.
        clip_lr: cap the ratio at 1 relative to lr, as above.
        eps: >= 0, keeps the ratio finite.
        exclude_bias_and_norm: leave <= 1-dimensional tensors unadapted and undecayed.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: Positive,
        momentum: Momentum = 0.9,
        weight_decay: NonNegative = 1e-4,
        trust_coefficient: Positive = 0.02,
        clip_lr: bool = True,
        eps: Positive = 1e-8,
        exclude_bias_and_norm: bool = True,
    ):
        if lr <= 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {weight_decay}")
        if trust_coefficient <= 0:
            raise ValueError(f"trust_coefficient must be > 0, got {trust_coefficient}")
        if eps < 0:
            raise ValueError(f"eps must be >= 0, got {eps}")
        defaults = {
            "lr": lr,
            "momentum": momentum,
            "weight_decay": weight_decay,
            "trust_coefficient": trust_coefficient,
            "clip_lr": clip_lr,
            "eps": eps,
            "exclude_bias_and_norm": exclude_bias_and_norm,
        }
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                update = p.grad
                if not (group["exclude_bias_and_norm"] and p.ndim <= 1):
                    update = update.add(p, alpha=wd)
                    update = update.mul_(self._trust_ratio(p, p.grad, group))
                state = self.state[p]
                buf = state.get("momentum_buffer")
                if buf is None:
                    buf = state["momentum_buffer"] = update.clone()
                else:
                    buf.mul_(group["momentum"]).add_(update)
                p.add_(buf, alpha=-lr)
        return loss

    @staticmethod
    def _trust_ratio(p: Tensor, grad: Tensor, group: dict[str, Any]) -> Tensor:
        w_norm, g_norm = p.norm(), grad.norm()
        wd = group["weight_decay"]
        ratio = group["trust_coefficient"] * w_norm / (g_norm + wd * w_norm + group["eps"])
        if group["clip_lr"]:
            ratio = (ratio / group["lr"]).clamp(max=1.0)
        defined = (w_norm > 0) & (g_norm > 0)
        return torch.where(defined, ratio, torch.ones_like(ratio))

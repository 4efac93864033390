"""Exponential moving averages of networks (MoCo key encoder, BYOL target)."""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy that takes no gradient: the starting point of a momentum network."""
    target = copy.deepcopy(module)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


@torch.no_grad()
def update_momentum(online: nn.Module, target: nn.Module, m: float) -> None:
    """target <- m * target + (1 - m) * online for parameters; buffers are copied."""
    for p_t, p_o in zip(target.parameters(), online.parameters(), strict=True):
        p_t.lerp_(p_o.detach(), 1.0 - m)
    for b_t, b_o in zip(target.buffers(), online.buffers(), strict=True):
        b_t.copy_(b_o)


def cosine_momentum(step: int, total_steps: int, base: float) -> float:
    """BYOL's schedule: tau = 1 - (1 - base) * (cos(pi * step / total) + 1) / 2, base -> 1."""
    progress = min(step / max(total_steps, 1), 1.0)
    return 1.0 - (1.0 - base) * (math.cos(math.pi * progress) + 1.0) / 2.0

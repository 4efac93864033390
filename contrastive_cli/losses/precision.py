"""Losses compute in float32 (or the float64 they are given), also inside a bf16 autocast.

Under autocast a matmul runs in bf16 (8 significant bits): a distance matrix gets ties
that change which negatives are mined, and batch statistics such as Barlow Twins'
(1 - c_ii)^2 lose their small differences. A loss is a small part of a step's work, so
it runs in full precision; gradients flow back to the bf16 inputs through the cast.
"""

from __future__ import annotations

import contextlib

import torch
from torch import Tensor


def full_precision(x: Tensor) -> contextlib.AbstractContextManager[object]:
    """A context with autocast off on ``x``'s device type (a no-op where there is none)."""
    try:
        return torch.autocast(x.device.type, enabled=False)
    except RuntimeError:  # a device type without autocast (meta)
        return contextlib.nullcontext()


def upcast(x: Tensor) -> Tensor:
    """bf16 / fp16 -> float32; float32, float64 and integer tensors unchanged."""
    return x.float() if x.is_floating_point() and x.element_size() < 4 else x

"""Losses compute in float32, also inside bf16 autocast."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import torch
from torch import Tensor

P = ParamSpec("P")
R = TypeVar("R")


def float32_math(loss: Callable[P, R]) -> Callable[P, R]:
    """Run ``loss`` in float32 (or float64) with autocast off: bf16/fp16 tensor arguments are
    upcast to float32 (their gradients flow back in the caller's dtype).

    Under bf16 autocast the projections arrive in bf16 (8-bit mantissa). Left to autocast,
    F.normalize would run in bf16 and the similarity product would be cast to bf16 again
    (cosines near 1 are then 0.004 apart, x 1/T = 10-20 in the logits); only the final
    cross-entropy is float32 by autocast's rules. These products are (2N, 2N) or (N, K),
    small beside the encoder, so float32 costs nothing measurable.
    """

    @functools.wraps(loss)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)]
        device_type = tensors[0].device.type if tensors else "cpu"
        with torch.autocast(device_type, enabled=False):
            args = tuple(_float(a) for a in args)  # type: ignore[assignment]
            kwargs = {k: _float(v) for k, v in kwargs.items()}  # type: ignore[assignment]
            return loss(*args, **kwargs)

    return wrapper


def _float(x: object) -> object:
    """bf16/fp16 -> float32; float32 and float64 stay as they are."""
    if isinstance(x, Tensor) and x.is_floating_point():
        return x.to(torch.promote_types(x.dtype, torch.float32))
    return x

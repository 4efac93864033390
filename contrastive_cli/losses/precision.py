"""Losses compute in float32 (or the float64 they are given), also inside a bf16 autocast.

Under autocast a matmul runs in bf16 (8 significant bits): a distance matrix gets ties
that change which negatives are mined, and batch statistics such as Barlow Twins'
(1 - c_ii)^2 lose their small differences. A loss is a small part of a step's work, so
it runs in full precision; gradients flow back to the bf16 inputs through the cast.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from typing import ParamSpec, TypeVar

import torch
from torch import Tensor

P = ParamSpec("P")
R = TypeVar("R")


def full_precision(x: Tensor) -> contextlib.AbstractContextManager[object]:
    """A context with autocast off on ``x``'s device type (a no-op where there is none)."""
    try:
        return torch.autocast(x.device.type, enabled=False)
    except RuntimeError:  # a device type without autocast (meta)
        return contextlib.nullcontext()


def upcast(x: Tensor) -> Tensor:
    """bf16 / fp16 -> float32; float32, float64 and integer tensors unchanged."""
    return x.float() if x.is_floating_point() and x.element_size() < 4 else x


def float32_math(loss: Callable[P, R]) -> Callable[P, R]:
    """``loss`` run with autocast off and its bf16/fp16 tensor arguments upcast (see the
    module docstring), for losses whose tensors are all plain arguments.

    Under bf16 autocast the projections arrive in bf16: F.normalize would run in bf16 and
    the similarity product would be cast to bf16 again (cosines near 1 are then 0.004 apart,
    x 1/T = 10-20 in the logits); only the final cross-entropy is float32 by autocast's
    rules. These products are (2N, 2N) or (N, K), small beside the encoder.
    """

    @functools.wraps(loss)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, Tensor)), None)
        with full_precision(first) if first is not None else contextlib.nullcontext():
            args = tuple(_up(a) for a in args)  # type: ignore[assignment]
            kwargs = {k: _up(v) for k, v in kwargs.items()}  # type: ignore[assignment]
            return loss(*args, **kwargs)

    return wrapper


def _up(x: object) -> object:
    return upcast(x) if isinstance(x, Tensor) else x

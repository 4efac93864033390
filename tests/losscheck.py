"""Helpers for the loss tests (not collected as tests): float64 inputs, values with their
input gradients, and the multi-process contract checked by simulation in one process."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from contrastive_cli.distributed import local_only
from tests.fakes import mean_over_ranks


def randn(*shape: int, seed: int) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def unit(x: Tensor) -> Tensor:
    """x scaled to norm 1 (a naive reference's normalisation, for any shape)."""
    return x / x.norm()


def value_and_grads(
    fn: Callable[..., Tensor], *inputs: Tensor
) -> tuple[Tensor, tuple[Tensor, ...]]:
    """fn(*inputs) and its gradient with respect to each floating-point input (fresh leaves;
    zeros for an input the value does not depend on)."""
    leaves = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
    value = fn(*leaves)
    grads = torch.autograd.grad(
        value, [x for x in leaves if x.requires_grad], materialize_grads=True
    )
    return value.detach(), grads


def assert_close(a: Tensor | float, b: Tensor | float, rel: float = 1e-10, abs_: float = 1e-12):
    a, b = torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert torch.allclose(a, b, rtol=rel, atol=abs_), f"max difference {(a - b).abs().max()}"


def assert_matches(fn: Callable[..., Tensor], reference: Callable[..., Tensor], *inputs: Tensor):
    """fn and reference agree on the value and on every input gradient (float64, 1e-10)."""
    value, grads = value_and_grads(fn, *inputs)
    expected, expected_grads = value_and_grads(reference, *inputs)
    assert_close(value, expected)
    for g, e in zip(grads, expected_grads, strict=True):
        assert_close(g, e)


def assert_ranks_equal_whole(loss: Callable[..., Tensor], world: int, *inputs: Tensor) -> None:
    """``loss(gather, *inputs)``: the mean over ``world`` simulated processes (each holding a
    block of rows of every input) equals the single-process loss of the whole batch, and so
    does its gradient with respect to every floating-point input, to 1e-10."""

    def whole(*xs: Tensor) -> Tensor:
        return loss(local_only, *xs)

    def ranks(*xs: Tensor) -> Tensor:
        return mean_over_ranks(loss, world, *xs)

    assert_matches(ranks, whole, *inputs)

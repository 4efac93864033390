"""Test doubles shared by several test modules (not collected as tests)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from torch import Tensor


def run_ranks(fn: Callable[..., Any], per_rank: Sequence[Sequence[Any]], timeout: float = 30) -> list[Any]:
    """Run ``fn(gather, *per_rank[r])`` for every rank r at once, in threads.

    ``gather`` behaves like an all-gather across the simulated processes: each call blocks
    until every rank has made its call of the same index, then returns the ranks' rows
    concatenated in rank order (this rank's own tensor in its place, so gradients reach
    it) and this rank's offset. A real concurrent exchange, so code whose later gathers
    depend on earlier results (ids offset by rank) is simulated faithfully.
    """
    world = len(per_rank)
    barrier = threading.Barrier(world, timeout=timeout)
    slots: dict[int, list[Tensor | None]] = {}
    lock = threading.Lock()

    def make_gather(rank: int) -> Callable[[Tensor], tuple[Tensor, int]]:
        calls = 0

        def gather(x: Tensor) -> tuple[Tensor, int]:
            nonlocal calls
            index, calls = calls, calls + 1
            with lock:
                slots.setdefault(index, [None] * world)[rank] = x.detach()
            barrier.wait()
            parts = [x if r == rank else slots[index][r] for r in range(world)]
            offset = sum(p.shape[0] for p in parts[:rank])
            return torch.cat(parts), offset

        return gather

    def work(rank: int) -> Any:
        try:
            return fn(make_gather(rank), *per_rank[rank])
        except BaseException:
            barrier.abort()
            raise

    with ThreadPoolExecutor(world) as pool:
        futures = [pool.submit(work, r) for r in range(world)]
        return [f.result() for f in futures]

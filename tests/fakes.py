"""Test doubles shared by several test modules (not collected as tests)."""

from __future__ import annotations

import copy
import gzip
import pickle
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn


def run_ranks(
    fn: Callable[..., Any],
    per_rank: Sequence[Sequence[Any]],
    timeout: float = 30,
    carry_grad: bool = False,
) -> list[Any]:
    """Run ``fn(gather, *per_rank[r])`` for every rank r at once, in threads.

    ``gather`` behaves like an all-gather across the simulated processes: each call blocks
    until every rank has made its call of the same index, then returns the ranks' rows
    concatenated in rank order (this rank's own tensor in its place, so gradients reach
    it) and this rank's offset. A real concurrent exchange, so code whose later gathers
    depend on earlier results (ids offset by rank) is simulated faithfully.

    With ``carry_grad`` the other ranks' rows keep their autograd graphs too: a backward
    through every rank's loss then sums each row's gradient over the ranks, as the real
    all-gather's backward does (see ``mean_over_ranks``).
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
                slots.setdefault(index, [None] * world)[rank] = x if carry_grad else x.detach()
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


def mean_over_ranks(fn: Callable[..., Tensor], world: int, *tensors: Tensor) -> Tensor:
    """The mean over ``world`` simulated processes of ``fn(gather, *chunks_r)``, where rank r
    holds the r-th of ``world`` equal row blocks of each tensor.

    The chunks are slices of the given tensors and each rank's gathered rows keep their
    graphs, so the gradient of the result with respect to those tensors is what multi-process
    training computes: the all-gather's backward sums each row's gradient over the processes,
    and DDP averages the parameters' gradients over them (the mean here). A loss written for
    that contract gives the single-process loss and gradient of the whole batch.
    """
    if any(len(t) % world for t in tensors):
        raise ValueError(f"rows must split into {world} equal blocks")
    per_rank = [tuple(t.chunk(world)[r] for t in tensors) for r in range(world)]
    return torch.stack(run_ranks(fn, per_rank, carry_grad=True)).mean()


def on_replicas(
    method: nn.Module, per_rank: Sequence[Sequence[Any]], step: Callable[..., Any]
) -> list[Any]:
    """``step(replica, *per_rank[r])`` on every simulated rank r at once (``run_ranks``), each
    replica a deep copy of ``method`` whose ``gather`` is that rank's: what each of N
    processes computes, to compare with ``method`` given the whole batch."""

    def work(gather: Callable[..., Any], *inputs: Any) -> Any:
        replica = copy.deepcopy(method)
        replica.gather = gather
        return step(replica, *inputs)

    return run_ranks(work, per_rank)


def rank_blocks(world: int, *tensors: Tensor) -> list[tuple[Tensor, ...]]:
    """Rank r's share of a global batch: the r-th of ``world`` equal row blocks of each tensor."""
    n = len(tensors[0]) // world
    return [tuple(t[r * n : (r + 1) * n] for t in tensors) for r in range(world)]


# --------------------------------------------------------------------------- small methods
class Flat(nn.Module):
    """A BatchNorm-free encoder, so a sample's features do not depend on its batch."""

    def __init__(self, in_dim: int = 12, out_dim: int = 6):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_dim, out_dim), nn.Tanh())
        self.out_dim = out_dim

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def views(n: int, seed: int = 0, shape: tuple[int, ...] = (3, 2, 2)) -> tuple[Tensor, Tensor]:
    """Two seeded batches of n random images of ``shape``: a step's two views."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g), torch.randn(n, *shape, generator=g)


# --------------------------------------------------------------------------- dataset files
def write_idx(path: Path, array: np.ndarray, gz: bool = False) -> Path:
    """An IDX file as in the MNIST distribution: magic 0x0000 08 <ndim>, big-endian dims, uint8."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    raw = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
        raw = gzip.compress(raw)
    path.write_bytes(raw)
    return path


def write_mnist(
    directory: Path,
    gz: bool = False,
    n_train: int = 6,
    n_test: int = 4,
    size: int = 28,
    seed: int = 0,
) -> dict[str, np.ndarray]:
    """The four MNIST-family IDX files of random tiny splits; returns the arrays written."""
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, size, size), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, size, size), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    for name, array in arrays.items():
        write_idx(directory / name, array, gz)
    return arrays


def write_cifar_batch(
    path: Path, data: np.ndarray, labels: list[int], label_key: str = "labels", protocol: int = 2
) -> None:
    """A python-version CIFAR batch: a pickled dict with bytes keys, as in the archives."""
    batch = {
        b"batch_label": b"a tiny batch",
        label_key.encode(): labels,
        b"data": data,
        b"filenames": [f"img_{i}.png".encode() for i in range(len(labels))],
    }
    if label_key == "fine_labels":
        batch[b"coarse_labels"] = [y // 5 for y in labels]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        pickle.dump(batch, f, protocol=protocol)


def write_cifar(
    directory: Path,
    files: Sequence[str],
    label_key: str = "labels",
    num_classes: int = 10,
    per_file: int = 2,
    seed: int = 0,
) -> dict[str, tuple[np.ndarray, list[int]]]:
    """Tiny CIFAR batch files in ``directory``; returns {file: (data (N, 3072), labels)}."""
    rng = np.random.default_rng(seed)
    written = {}
    for name in files:
        data = rng.integers(0, 256, (per_file, 3072), dtype=np.uint8)
        labels = rng.integers(0, num_classes, per_file).tolist()
        write_cifar_batch(directory / name, data, labels, label_key)
        written[name] = (data, labels)
    return written

"""Test doubles shared by several test modules (not collected as tests)."""

from __future__ import annotations

import gzip
import pickle
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor


def run_ranks(
    fn: Callable[..., Any], per_rank: Sequence[Sequence[Any]], timeout: float = 30
) -> list[Any]:
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

"""The seeded batch stream: which images each training step sees."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Protocol

import torch
from torch import Tensor

from contrastive_cli.data.datasets import Split
from contrastive_cli.data.files import ImageFiles


def derive_seed(*parts: object) -> int:
    """A stable 63-bit seed from the run seed and a purpose, e.g. (seed, "augment", step).

    Everything random in a step is seeded from (seed, step), so a resumed run needs no
    saved generator state to continue exactly where it stopped.
    """
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def epoch_order(seed: int, epoch: int, n: int) -> Tensor:
    """The permutation of ``n`` images that ``epoch`` visits, from (seed, epoch) alone."""
    g = torch.Generator().manual_seed(derive_seed(seed, "order", epoch))
    return torch.randperm(n, generator=g)


class Batches(Protocol):
    """What the training loop iterates: ``len()`` steps per epoch of ``batch_size`` images
    (the global batch), of which each step yields this process's ``shard`` (offset, rows)."""

    batch_size: int
    shard: tuple[int, int]

    def __len__(self) -> int: ...

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[Tensor, Tensor | None]]: ...


class InMemoryBatches:
    """Batches of an in-memory split, a fresh seeded permutation each epoch.

    The images move to ``device`` once (``on_device``), so a step is an index into a
    tensor there; otherwise batches are gathered on the CPU, pinned and copied
    asynchronously. The last incomplete batch is dropped (constant batch size for
    BatchNorm and the losses).
    """

    def __init__(
        self,
        split: Split,
        batch_size: int,
        seed: int,
        device: torch.device,
        on_device: bool = True,
        shard: tuple[int, int] | None = None,
    ):
        if batch_size > len(split):
            raise ValueError(
                f"trainer.batch_size={batch_size} is larger than the {len(split)} training images"
            )
        self.batch_size = batch_size
        self.shard = shard or (0, batch_size)
        self.seed = seed
        self.device = device
        self.pin = device.type == "cuda" and not on_device
        target = device if on_device else torch.device("cpu")
        self.images = split.images.to(target)
        self.labels = split.labels.to(target) if split.labels is not None else None

    def __len__(self) -> int:
        return len(self.images) // self.batch_size

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[Tensor, Tensor | None]]:
        """Batches ``start, start+1, ...`` of ``epoch``: uint8 images and labels on device."""
        order = epoch_order(self.seed, epoch, len(self.images)).to(self.images.device)
        offset, rows = self.shard
        for b in range(start, len(self)):
            first = b * self.batch_size + offset
            idx = order[first : first + rows]
            images = self.images[idx]
            labels = self.labels[idx] if self.labels is not None else None
            if self.images.device != self.device:
                images = (
                    images.pin_memory().to(self.device, non_blocking=True)
                    if self.pin
                    else images.to(self.device)
                )
                if labels is not None:
                    labels = (
                        labels.pin_memory().to(self.device, non_blocking=True)
                        if self.pin
                        else labels.to(self.device)
                    )
            yield images, labels


class StreamingBatches:
    """Batches of image files: DataLoader workers decode them, in the order (and with the
    drop-last rule) of ``InMemoryBatches``, so both paths see the same images per step.

    Labels stay in memory; images are decoded per epoch and copied to ``device`` (from
    pinned memory on CUDA).
    """

    def __init__(
        self,
        split: Split,
        batch_size: int,
        seed: int,
        device: torch.device,
        shard: tuple[int, int] | None = None,
    ):
        if batch_size > len(split):
            raise ValueError(
                f"trainer.batch_size={batch_size} is larger than the {len(split)} training images"
            )
        self.files: ImageFiles = split.images  # type: ignore[assignment]
        self.labels = split.labels
        self.batch_size = batch_size
        self.shard = shard or (0, batch_size)
        self.seed = seed
        self.device = device

    def __len__(self) -> int:
        return len(self.files) // self.batch_size

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[Tensor, Tensor | None]]:
        """Batches ``start, start+1, ...`` of ``epoch``: uint8 images and labels on device."""
        order = epoch_order(self.seed, epoch, len(self.files))
        offset, rows = self.shard
        idx = [
            order[b * self.batch_size + offset : b * self.batch_size + offset + rows]
            for b in range(start, len(self))
        ]
        decoded = self.files.batches(
            [i.tolist() for i in idx], pin_memory=self.device.type == "cuda"
        )
        for i, images in zip(idx, decoded, strict=True):
            labels = self.labels[i].to(self.device) if self.labels is not None else None
            yield images.to(self.device, non_blocking=True), labels


def batches_of(
    split: Split,
    batch_size: int,
    seed: int,
    device: torch.device,
    on_device: bool = True,
    shard: tuple[int, int] | None = None,
) -> InMemoryBatches | StreamingBatches:
    """The training batch stream of ``split``: tensors are indexed in memory (on the device
    when ``on_device``); files stream through DataLoader workers that only decode. With
    ``shard=(offset, rows)``, each step yields only those rows of its global batch. Here, not
    a method of ``Split``, so that datasets need not import batches (no import cycle)."""
    if isinstance(split.images, ImageFiles):
        return StreamingBatches(split, batch_size, seed, device, shard)
    return InMemoryBatches(split, batch_size, seed, device, on_device, shard)

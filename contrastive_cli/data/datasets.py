"""Datasets: uint8 image tensors in memory, or image files decoded on demand, with labels."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from contrastive_cli.data.files import ImageFiles


@dataclass(frozen=True)
class Split:
    images: Tensor | ImageFiles  # (N, C, H, W) uint8 in memory, or files that decode to it
    labels: Tensor | None = None  # (N,) int64, or None when unlabelled
    paths: list[str] | None = None  # where each image came from, when it came from a file

    def __post_init__(self) -> None:
        if isinstance(self.images, Tensor) and (
            self.images.dtype != torch.uint8 or self.images.dim() != 4
        ):
            raise ValueError(
                f"images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}"
            )
        if self.labels is not None and self.labels.shape != (len(self),):
            raise ValueError(f"labels must be ({len(self)},), got {tuple(self.labels.shape)}")
        if self.paths is not None and len(self.paths) != len(self):
            raise ValueError(f"{len(self.paths)} paths for {len(self)} images")

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, idx: Tensor) -> Split:
        """The images at ``idx`` (int64 indices), with their labels and paths."""
        return Split(
            self.images[idx],
            self.labels[idx] if self.labels is not None else None,
            [self.paths[i] for i in idx.tolist()] if self.paths is not None else None,
        )


@dataclass(frozen=True)
class ImageData:
    """What a data source yields.

    ``pretrain`` is what self-supervised training sees; ``train``/``test`` are the
    labelled splits of the evaluation protocol (None when the data has no labels).
    """

    pretrain: Split
    train: Split | None
    test: Split | None
    num_classes: int
    class_names: list[str] | None = None

    @property
    def labelled(self) -> bool:
        return self.train is not None and self.test is not None

    def named_splits(self) -> dict[str, Split]:
        """Each distinct split once, by name: pretrain is left out where it is train."""
        splits = {"train": self.train, "test": self.test}
        if self.pretrain is not self.train:
            splits = {"pretrain": self.pretrain, **splits}
        return {name: split for name, split in splits.items() if split is not None}


def stratified_test_mask(labels: np.ndarray, test_fraction: float, seed: int = 0) -> np.ndarray:
    """A fixed held-out test set chosen with ``seed`` (not the run seed), so every run
    evaluates on the same images.

    ceil(n * test_fraction) test images in all (scikit-learn's convention: 360 of digits'
    1,797), spread over the classes in proportion, the leftover to the largest remainders;
    rounding each class on its own would drift from that total.
    """
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * test_fraction
    per_class = np.floor(quota).astype(int)
    leftover = math.ceil(len(labels) * test_fraction - 1e-9) - int(per_class.sum())
    per_class[np.argsort(per_class - quota, kind="stable")[:leftover]] += 1
    rng = np.random.default_rng(seed)
    test_idx: list[int] = []
    for c, k in zip(classes, per_class, strict=True):
        test_idx.extend(rng.permutation(np.flatnonzero(labels == c))[:k])
    is_test = np.zeros(len(labels), dtype=bool)
    is_test[np.asarray(test_idx, dtype=np.int64)] = True
    return is_test

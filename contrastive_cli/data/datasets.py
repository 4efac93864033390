"""Datasets: uint8 image tensors in memory, or image files decoded on demand, with labels."""

from __future__ import annotations

import dataclasses
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
    1,797), spread over the classes in proportion (``stratified_pick``).
    """
    return stratified_pick(labels, math.ceil(len(labels) * test_fraction - 1e-9), seed)


def stratified_pick(labels: np.ndarray, count: int, seed: int = 0) -> np.ndarray:
    """A mask of exactly ``count`` images chosen with ``seed``, spread over the classes in
    proportion to their sizes, the leftover to the largest remainders (rounding each class
    on its own would drift from the total)."""
    classes, counts = np.unique(labels, return_counts=True)
    quota = counts * (count / len(labels))
    per_class = np.floor(quota).astype(int)
    leftover = count - int(per_class.sum())
    per_class[np.argsort(per_class - quota, kind="stable")[:leftover]] += 1
    rng = np.random.default_rng(seed)
    picked: list[int] = []
    for c, k in zip(classes, per_class, strict=True):
        picked.extend(rng.permutation(np.flatnonzero(labels == c))[:k])
    mask = np.zeros(len(labels), dtype=bool)
    mask[np.asarray(picked, dtype=np.int64)] = True
    return mask


def _capped(split: Split, at_most: int | None) -> Split:
    """At most ``at_most`` images of ``split``: a fixed subset (seed 0, not the run seed, so
    every run of the same setting sees the same images), stratified by label where there
    are labels, in the split's own order."""
    if at_most is None or len(split) <= at_most:
        return split
    if split.labels is not None:
        keep = np.flatnonzero(stratified_pick(split.labels.numpy(), at_most, seed=0))
    else:
        keep = np.sort(np.random.default_rng(0).permutation(len(split))[:at_most])
    return split.subset(torch.from_numpy(keep))


def capped(data: ImageData, train: int | None, test: int | None) -> ImageData:
    """``data`` with at most ``train`` images pretrained on and in the labelled train split
    and at most ``test`` in the test split (``data.train_images``, ``data.test_images``):
    smaller, comparable runs on a CPU. Pretraining on the train split stays that split."""
    if train is None and test is None:
        return data
    new_train = _capped(data.train, train) if data.train is not None else None
    pretrain = new_train if data.pretrain is data.train else _capped(data.pretrain, train)
    new_test = _capped(data.test, test) if data.test is not None else None
    return dataclasses.replace(data, pretrain=pretrain, train=new_train, test=new_test)

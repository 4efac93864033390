"""In-memory datasets: uint8 image tensors with int64 labels."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Split:
    images: Tensor                 # (N, C, H, W) uint8
    labels: Tensor | None = None   # (N,) int64, or None when unlabelled

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels is not None and self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"labels must be ({self.images.shape[0]},), got {tuple(self.labels.shape)}")

    def __len__(self) -> int:
        return self.images.shape[0]


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

    @property
    def labelled(self) -> bool:
        return self.train is not None and self.test is not None

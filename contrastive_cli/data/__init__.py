"""Datasets as uint8 tensors, the seeded batch stream and batched augmentation."""

from contrastive_cli.data.augment import Augment
from contrastive_cli.data.datasets import ImageData, Split

__all__ = ["Augment", "ImageData", "Split"]

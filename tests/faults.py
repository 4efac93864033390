"""Fault injectors that configs can point at (``_target_=tests.faults...``) in subprocess tests."""

from __future__ import annotations

import urllib.error
from collections.abc import Sequence
from pathlib import Path

from torch import Tensor, nn


def offline_downloader(root: str, train: bool, download: bool) -> None:
    """Stands in for torchvision's dataset classes on a machine without network: like them,
    it makes ``<root>/MNIST/raw`` before it tries to download."""
    (Path(root) / "MNIST" / "raw").mkdir(parents=True, exist_ok=True)
    raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")


class UnpaddedConvNet(nn.Module):
    """3x3 stride-2 convolutions without padding: each one shrinks the image to (s-3)//2+1,
    so deep enough stacks fail on small images (what encoder validation must catch)."""

    def __init__(self, in_channels: int, image_size: int, widths: Sequence[int] = (8, 8, 8, 8)):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for w in widths:
            layers += [nn.Conv2d(c, w, 3, 2, 0), nn.ReLU()]
            c = w
        self.net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_dim = c

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

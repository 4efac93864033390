"""Fault injectors that configs can point at (``_target_=tests.faults...``) in subprocess tests."""

from __future__ import annotations

import os
import urllib.error
from collections.abc import Sequence
from typing import Any

from torch import Tensor, nn

from contrastive_cli.data import ImageData
from contrastive_cli.data.sources import load_digits
from contrastive_cli.errors import DataError
from contrastive_cli.methods.simclr import SimCLR


def offline_downloader(root: str, train: bool, download: bool) -> None:
    """Stands in for torchvision's dataset classes on a machine without network."""
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


# --------------------------------------------------------------------------- one rank fails
# A test sets CONTRAST_FAULT_RANK (and CONTRAST_FAULT_STEP) in the environment of
# `contrast train trainer.devices=2`; only that rank's worker fails, and only in the first
# attempt of an elastically restarted group (so a restart can succeed) unless
# CONTRAST_FAULT_EVERY_ATTEMPT is set.
def _faulty_here() -> bool:
    return os.environ.get("RANK") == os.environ.get("CONTRAST_FAULT_RANK") and (
        os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        or bool(os.environ.get("CONTRAST_FAULT_EVERY_ATTEMPT"))
    )


class CrashingSimCLR(SimCLR):
    """SimCLR whose CONTRAST_FAULT_STEP-th training step raises an unexpected exception."""

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._steps = 0

    def forward(self, views: Sequence[Tensor], labels: Tensor | None = None) -> Tensor:
        self._steps += 1
        if _faulty_here() and self._steps == int(os.environ.get("CONTRAST_FAULT_STEP", "1")):
            raise RuntimeError(f"injected fault at step {self._steps}")
        return super().forward(views, labels)


def digits_failing_on_one_rank(**kwargs: Any) -> ImageData:
    """Digits, except on CONTRAST_FAULT_RANK, where loading fails as a missing folder does."""
    if _faulty_here():
        raise DataError("/data/on/this/node: no such folder (injected on one rank)")
    return load_digits(**kwargs)

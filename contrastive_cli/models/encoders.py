"""Encoders: images (B, C, H, W) -> features (B, out_dim). Each exposes ``out_dim``."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Annotated, Literal

import torch
import torchvision
from torch import Tensor, nn

from contrastive_cli.schema import NonEmpty, PositiveInt


class MLP(nn.Module):
    """Flattened pixels through fully connected layers with BatchNorm and ReLU."""

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        hidden_dims: Annotated[Sequence[PositiveInt], NonEmpty] = (512, 512),
    ):
        super().__init__()
        dims = [in_channels * image_size * image_size, *hidden_dims]
        layers: list[nn.Module] = [nn.Flatten()]
        for d_in, d_out in itertools.pairwise(dims):
            layers += [
                nn.Linear(d_in, d_out, bias=False),
                nn.BatchNorm1d(d_out),
                nn.ReLU(inplace=True),
            ]
        self.net = nn.Sequential(*layers)
        self.out_dim = dims[-1]

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class ConvNet(nn.Module):
    """A small conv net: 3x3 conv-BN-ReLU blocks, then global average pooling.

    With the default widths and all strides 2 it trains at several thousand 28x28 images/s
    on two CPU cores; a stride-1 first block costs 3-5x more there (``make bench``).
    """

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        widths: Annotated[Sequence[PositiveInt], NonEmpty] = (32, 64, 128, 256),
        strides: Annotated[Sequence[PositiveInt], NonEmpty] = (2, 2, 2, 2),
    ):
        super().__init__()
        if len(widths) != len(strides):
            raise ValueError(
                f"encoder.widths and encoder.strides differ in length: {list(widths)} vs {list(strides)}"
            )
        layers: list[nn.Module] = []
        c = in_channels
        for w, s in zip(widths, strides, strict=True):
            layers += [
                nn.Conv2d(c, w, 3, s, 1, bias=False),
                nn.BatchNorm2d(w),
                nn.ReLU(inplace=True),
            ]
            c = w
        self.net = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.out_dim = c

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


class ResNet18(nn.Module):
    """torchvision's ResNet-18 without its classifier (512-d features).

    For small images (``stem=small``, the default below 96 px) the 7x7/2 stem and the
    max-pool are replaced by a 3x3/1 conv, as in the SimCLR and MoCo CIFAR recipes.
    """

    def __init__(
        self, in_channels: int, image_size: int, stem: Literal["auto", "small", "imagenet"] = "auto"
    ):
        super().__init__()
        if stem not in ("auto", "small", "imagenet"):
            raise ValueError(f"encoder.stem must be auto, small or imagenet, got {stem!r}")
        small = stem == "small" or (stem == "auto" and image_size < 96)
        net = torchvision.models.resnet18(weights=None)
        if small:
            net.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
            net.maxpool = nn.Identity()
        elif in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        net.fc = nn.Identity()
        self.net = net
        self.out_dim = 512

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def num_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@torch.no_grad()
def output_shape(encoder: nn.Module, in_channels: int, image_size: int) -> torch.Size:
    """Run one dummy batch on CPU to check that the encoder accepts this image shape."""
    was_training = encoder.training
    encoder.eval()
    try:
        return encoder(torch.zeros(2, in_channels, image_size, image_size)).shape
    finally:
        encoder.train(was_training)

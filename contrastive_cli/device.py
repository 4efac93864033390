"""Resolve the ``device`` config group into what the training loop needs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

import torch

from contrastive_cli.errors import ConfigError

DeviceType = Literal["auto", "cpu", "cuda", "mps"]
Precision = Literal["fp32", "bf16"]
DEVICES: tuple[str, ...] = get_args(DeviceType)
PRECISIONS: tuple[str, ...] = get_args(Precision)


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    autocast: bool  # bf16 autocast (CUDA only)
    channels_last: bool  # NHWC activations (CUDA only)
    compile: bool
    data_on_device: bool

    def describe(self) -> str:
        extras = [
            n
            for n, on in (
                ("bf16", self.autocast),
                ("channels_last", self.channels_last),
                ("compile", self.compile),
            )
            if on
        ]
        name = (
            torch.cuda.get_device_name(self.device)
            if self.device.type == "cuda"
            else self.device.type
        )
        return name + (f" ({', '.join(extras)})" if extras else "")


def _mps_available() -> bool:
    return hasattr(torch.backends, "mps") and torch.backends.mps.is_available()


def resolve_device(
    type: DeviceType = "auto",
    precision: Precision = "bf16",
    channels_last: bool = True,
    compile: bool = False,
    data_on_device: bool = True,
) -> Runtime:
    """auto -> cuda, else mps, else cpu. Mixed precision and channels_last apply on CUDA only:
    on CPU they would slow training down, and MPS bf16 support is uneven."""
    if type not in DEVICES:
        raise ConfigError(f"device.type={type!r} is not allowed; allowed: {', '.join(DEVICES)}")
    if precision not in PRECISIONS:
        raise ConfigError(
            f"device.precision={precision!r} is not allowed; allowed: {', '.join(PRECISIONS)}"
        )
    if type == "auto":
        type = "cuda" if torch.cuda.is_available() else "mps" if _mps_available() else "cpu"
    if type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            "device=cuda but no CUDA GPU is visible to PyTorch; use device=auto or device=cpu"
        )
    if type == "mps" and not _mps_available():
        raise ConfigError(
            "device=mps but MPS is not available on this machine; use device=auto or device=cpu"
        )
    cuda = type == "cuda"
    return Runtime(
        device=torch.device(type),
        autocast=cuda and precision == "bf16",
        channels_last=cuda and channels_last,
        compile=compile,
        data_on_device=data_on_device,
    )

"""Resolve the ``device`` config group into what the training loop needs."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

import torch

from contrastive_cli.errors import ConfigError

log = logging.getLogger(__name__)

DeviceType = Literal["auto", "cpu", "cuda", "mps"]
Precision = Literal["auto", "bf16", "fp32"]
DEVICES: tuple[str, ...] = get_args(DeviceType)
PRECISIONS: tuple[str, ...] = get_args(Precision)
# CPU features that run bf16 matrix products in hardware: AVX512-BF16 (Cooper Lake, Zen 4 and
# later), AMX-BF16 (Sapphire Rapids and later), Arm's BF16 extension (Neoverse V1/N2, Graviton 3).
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})


@dataclass(frozen=True)
class Runtime:
    device: torch.device
    autocast: bool  # bf16 autocast (where the device has native bf16; see resolve_device)
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


def native_bf16(
    device_type: str, cpu_flags: Iterable[str] = (), cuda_capability: tuple[int, int] = (0, 0)
) -> bool:
    """Whether a device multiplies bf16 matrices in hardware: CUDA from compute capability 8.0
    (Ampere), a CPU with one of ``BF16_CPU_FLAGS``. Elsewhere bf16 is emulated through float32
    and autocast only adds conversions."""
    if device_type == "cuda":
        return tuple(cuda_capability) >= (8, 0)
    if device_type == "cpu":
        return not BF16_CPU_FLAGS.isdisjoint(cpu_flags)
    return False


def cpu_flags() -> set[str]:
    """This CPU's feature flags: /proc/cpuinfo's ``flags`` (x86) or ``Features`` (Arm) line,
    plus what torch detects itself (also where there is no /proc, e.g. macOS)."""
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("flags", "Features"):
                flags.update(value.split())
                break
    except OSError:
        pass
    probes = {"avx512_bf16": "_is_avx512_bf16_supported", "amx_tile": "_is_amx_tile_supported"}
    for flag, probe in probes.items():
        if getattr(torch.cpu, probe, lambda: False)():
            flags.add(flag)
    if "amx_tile" in flags:  # every AMX CPU so far has AMX-BF16
        flags.add("amx_bf16")
    return flags


def device_has_native_bf16(device: torch.device) -> bool:
    """``native_bf16`` for this process's device (CUDA capability, this CPU's flags)."""
    if device.type == "cuda":
        return native_bf16("cuda", cuda_capability=torch.cuda.get_device_capability(device))
    if device.type == "cpu":
        return native_bf16("cpu", cpu_flags())
    return False


def _mps_available() -> bool:
    return hasattr(torch.backends, "mps") and torch.backends.mps.is_available()


def resolve_device(
    type: DeviceType = "auto",
    precision: Precision = "auto",
    channels_last: bool = True,
    compile: bool = False,
    data_on_device: bool = True,
) -> Runtime:
    """auto -> cuda, else mps, else cpu.

    ``precision``: ``bf16`` autocasts to bf16 where the device has native bf16 (CUDA from
    Ampere, a CPU with AVX512-BF16/AMX/Arm BF16) and runs float32 elsewhere; ``fp32`` always
    runs float32; ``auto`` is bf16 on CUDA and float32 on CPU and MPS. bf16 on the CPU is
    opt-in: measured within seed noise of float32 at equal epochs (README, Speed), but as a
    default it would make one command give different numbers on CPUs with and without
    native bf16. channels_last
    applies on CUDA only: on CPU it slows these models down.
    """
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
    device = torch.device(type)
    wants_bf16 = precision == "bf16" or (precision == "auto" and type == "cuda")
    autocast = wants_bf16 and device_has_native_bf16(device)
    if wants_bf16 and not autocast:
        log.info(f"device.precision={precision}: {type} has no native bf16 here; running float32")
    return Runtime(
        device=device,
        autocast=autocast,
        channels_last=type == "cuda" and channels_last,
        compile=compile,
        data_on_device=data_on_device,
    )

"""device.precision: bf16 autocast only where the device multiplies bf16 in hardware."""

from __future__ import annotations

import pytest
import torch

from contrastive_cli import device as device_module
from contrastive_cli.device import cpu_flags, native_bf16, resolve_device
from contrastive_cli.errors import ConfigError

# /proc/cpuinfo flags of real CPUs (abridged to the relevant ones)
SKYLAKE_X = {"sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni"}
SAPPHIRE_RAPIDS = SKYLAKE_X | {"avx512_bf16", "amx_tile", "amx_bf16", "amx_int8", "avx512_fp16"}
ZEN4 = {"avx", "avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni"}
GRAVITON3 = {"fp", "asimd", "sve", "svebf16", "bf16", "i8mm"}
GRAVITON2 = {"fp", "asimd", "asimddp", "lrcpc"}


@pytest.mark.parametrize(
    "flags,native",
    [
        (SKYLAKE_X, False),
        (SAPPHIRE_RAPIDS, True),
        (ZEN4, True),
        (GRAVITON3, True),
        (GRAVITON2, False),
        (set(), False),
    ],
)
def test_cpu_native_bf16_follows_the_feature_flags(flags, native):
    assert native_bf16("cpu", flags) is native


@pytest.mark.parametrize(
    "capability,native", [((7, 0), False), ((7, 5), False), ((8, 0), True), ((9, 0), True)]
)
def test_cuda_native_bf16_from_ampere(capability, native):
    assert native_bf16("cuda", cuda_capability=capability) is native


def test_mps_is_never_native_bf16():
    assert not native_bf16("mps", SAPPHIRE_RAPIDS)


def test_this_cpus_flags_agree_with_torch():
    flags = cpu_flags()
    if getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)():
        assert "avx512_bf16" in flags and native_bf16("cpu", flags)


@pytest.mark.parametrize("native", [True, False])
def test_cpu_precision_bf16_autocasts_only_with_native_bf16(monkeypatch, native):
    monkeypatch.setattr(
        device_module, "cpu_flags", lambda: SAPPHIRE_RAPIDS if native else SKYLAKE_X
    )
    assert resolve_device("cpu", "bf16").autocast is native
    assert not resolve_device("cpu", "fp32").autocast
    assert not resolve_device("cpu", "auto").autocast  # CPU bf16 stays opt-in
    assert ("bf16" in resolve_device("cpu", "bf16").describe()) is native


def test_an_unknown_precision_is_a_config_error():
    with pytest.raises(ConfigError, match=r"device.precision='fp16' is not allowed; allowed: auto"):
        resolve_device("cpu", "fp16")

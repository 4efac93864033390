"""What every benchmark shares: options, the data, timing statistics, machine info, output.

Each benchmark writes ``<out>/<name>.json`` (machine, settings, every measured run, summary)
and ``<out>/<name>.md`` (the table), and ``<out>/README.md`` gathers the tables. Numbers
come only from measurements; targets are stated beside them, never asserted.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf, open_dict

from contrastive_cli.config import compose, config_groups
from contrastive_cli.data.datasets import ImageData, Split
from contrastive_cli.errors import DataError
from contrastive_cli.report import versions, write_json

RESULTS = Path(__file__).resolve().parent / "results"
LOSSES = tuple(config_groups()["loss"])  # every conf/loss option: a new method is benchmarked too
ORDER = ("throughput", "evaluation", "memory", "quality", "distributed", "encoders")  # README order


@dataclass
class Options:
    """Command-line options shared by the benchmarks (``python -m benchmarks --help``)."""

    out: Path = RESULTS
    quick: bool = False
    device: str = "auto"
    data: str = "auto"  # auto | fashion_mnist | digits | synthetic
    losses: Sequence[str] = LOSSES
    repeats: int = 5
    steps: int = 30  # optimizer steps per measured (partial) epoch
    workers: int = 2  # DataLoader workers of the conventional pipeline
    compile: bool = False
    epochs: int = 5  # quality: fixed epoch budget
    minutes: float = 5.0  # quality: fixed training-time budget per loss
    threads: int | None = None  # torch intra-op threads (None: torch's default)
    overrides: Sequence[str] = ()  # extra config overrides for every run
    extra: dict[str, Any] = field(default_factory=dict)

    def config(self, *overrides: str) -> DictConfig:
        """The config ``contrast train`` would run: data=fashion_mnist recipe, cnn encoder."""
        base = ["data=fashion_mnist", "encoder=cnn", f"device={self.device}"]
        if self.compile:
            base.append("device.compile=true")
        cfg = compose([*base, *overrides, *self.overrides])
        with open_dict(cfg):
            cfg.pop("hydra", None)
        return cfg


# --------------------------------------------------------------------------- data
def load_images(opts: Options, cfg: DictConfig, size: int | None = None) -> tuple[ImageData, str]:
    """Fashion-MNIST when present (``data=auto``: found on disk, never downloaded), else
    digits upsampled to 28x28, else synthetic images; ``size`` keeps the first ``size``
    training images (tiny runs)."""
    from contrastive_cli.parts import load_data

    choice = opts.data
    data: ImageData | None = None
    if choice in ("auto", "fashion_mnist"):
        try:
            if choice == "auto":  # present or not: no download attempt, no empty folder left
                cfg = cfg.copy()
                cfg.data.download = False
            data, name = load_data(cfg), "fashion_mnist"
        except DataError:
            if choice == "fashion_mnist":
                raise
            choice = "digits"
    if data is None and choice == "digits":
        data, name = _digits_28(cfg), "digits upsampled to 28x28, tiled to 60,000"
    if data is None:
        data, name = _synthetic(cfg), "synthetic uint8 noise"
    if size is not None:
        train = Split(data.train.images[:size], data.train.labels[:size])
        test = Split(data.test.images[: max(size // 4, 64)], data.test.labels[: max(size // 4, 64)])
        data = ImageData(pretrain=train, train=train, test=test, num_classes=data.num_classes)
    return data, name


def _digits_28(cfg: DictConfig) -> ImageData:
    from contrastive_cli.data.sources import load_digits

    digits = load_digits()
    side = cfg.data.image_size

    def up(split: Split, n: int) -> Split:
        x = F.interpolate(
            split.images.float(), size=(side, side), mode="bilinear", align_corners=False
        )
        reps = -(-n // len(x))
        images = x.round().clamp(0, 255).to(torch.uint8).repeat(reps, 1, 1, 1)[:n]
        return Split(images.contiguous(), split.labels.repeat(reps)[:n])

    train = up(digits.train, 60_000)
    return ImageData(pretrain=train, train=train, test=up(digits.test, 10_000), num_classes=10)


def _synthetic(cfg: DictConfig) -> ImageData:
    g = torch.Generator().manual_seed(0)
    shape = (cfg.data.channels, cfg.data.image_size, cfg.data.image_size)

    def split(n: int) -> Split:
        images = torch.randint(0, 256, (n, *shape), generator=g, dtype=torch.uint8)
        return Split(images, torch.randint(0, 10, (n,), generator=g))

    train = split(60_000)
    return ImageData(pretrain=train, train=train, test=split(10_000), num_classes=10)


# --------------------------------------------------------------------------- timing
def sync(device: torch.device) -> None:
    """Wait for queued device work, so a timer sees it (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


@dataclass
class Timed:
    wall_s: float
    cpu_s: float  # this process's CPU time: wall ~ cpu / threads when quiet


def timed(fn: Callable[[], object], device: torch.device) -> Timed:
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return Timed(time.perf_counter() - wall, time.process_time() - cpu)


def summary(values: Sequence[float]) -> dict[str, Any]:
    """Median with min and max beside it, and every run (so nothing is hidden)."""
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "runs": list(values),
    }


# --------------------------------------------------------------------------- machine
def machine() -> dict[str, Any]:
    """Where the numbers were taken. The load average says how quiet the machine was."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        **versions(),
    }
    return info


def machine_line(m: dict[str, Any]) -> str:
    gpu = f", GPU {m['cuda']}" if m.get("cuda") else ""
    return (
        f"{m['cpu']}, {m['usable_cores']} cores ({m['torch_threads']} torch threads){gpu}; "
        f"torch {m['torch']}, Python {m['python']}; {m['date']}; "
        f"load average {m['load_average_1m']:.2f} at start; git {m.get('git_sha') or '?'}"
    )


# --------------------------------------------------------------------------- output
def md_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(s: dict[str, Any], digits: int = 2, scale: float = 1.0) -> str:
    """'median (min-max)' of a summary()."""
    return (
        f"{s['median'] * scale:,.{digits}f} ({s['min'] * scale:,.{digits}f}"
        f"-{s['max'] * scale:,.{digits}f})"
    )


def write(
    opts: Options,
    name: str,
    title: str,
    started: dict[str, Any],
    settings: dict[str, Any],
    results: Any,
    table: str,
    notes: Sequence[str],
) -> Path:
    """``<name>.json`` and ``<name>.md`` in ``opts.out``, then the combined README."""
    opts.out.mkdir(parents=True, exist_ok=True)
    if opts.quick:
        notes = [
            "--quick: tiny sizes to check that the benchmark runs; these numbers mean nothing.",
            *notes,
        ]
    end = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    payload = {
        "benchmark": name,
        "title": title,
        "machine": {**started, "load_average_1m_end": end},
        "settings": _plain(settings),
        "results": _plain(results),
        "notes": list(notes),
        "table_md": table,
    }
    write_json(opts.out / f"{name}.json", payload)
    (opts.out / f"{name}.md").write_text(render(payload))
    write_readme(opts.out)
    return opts.out / f"{name}.json"


def render(payload: dict[str, Any]) -> str:
    notes = "".join(f"- {n}\n" for n in payload["notes"])
    return (
        f"## {payload['title']}\n\n{payload['table_md']}\n\n{notes}\n"
        f"Machine: {machine_line(payload['machine'])}.\n"
    )


def write_readme(out: Path) -> None:
    """README.md: every benchmark's table found in ``out``, in a fixed order."""
    parts = [
        "# `make bench` results\n",
        "Written by `python -m benchmarks` (`make bench`); each table's JSON next to it holds "
        "every run. Medians, with min-max in brackets.\n",
    ]
    names = [n for n in ORDER if (out / f"{n}.json").exists()]
    names += sorted(p.stem for p in out.glob("*.json") if p.stem not in ORDER)
    for name in names:
        try:
            payload = json.loads((out / f"{name}.json").read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if isinstance(payload, dict) and "table_md" in payload:
            parts.append(render(payload))
    (out / "README.md").write_text("\n".join(parts))


def _plain(x: Any) -> Any:
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return _plain(dataclasses.asdict(x))
    if isinstance(x, dict):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_plain(v) for v in x]
    if isinstance(x, Path):
        return str(x)
    if OmegaConf.is_config(x):
        return OmegaConf.to_container(x, resolve=True)
    return x

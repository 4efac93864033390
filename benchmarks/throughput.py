"""Training throughput: contrast's epoch against the pure model cost and a conventional
per-sample pipeline, for every loss, with the real configs and the real training loop.

Three ways to feed one method (built by ``run.build_training``, as ``contrast train`` does),
all through ``contrastive_cli.train.train`` so only the data path differs:

- ``contrast``: the real batch stream (seeded indices into the in-memory uint8 tensor) and
  the batched augmentation, two views per step;
- ``pure model``: views augmented once in advance and replayed, no indexing or movement:
  what the forward, backward and optimizer steps alone cost;
- ``conventional``: what peers do: a torchvision per-sample transform on PIL images in a
  ``DataLoader`` with workers, collated, then moved to the device (pinned on CUDA).

Epochs are partial: ``steps`` optimizer steps per measured run; the full-epoch time is
extrapolated from it. Runs are interleaved (contrast, pure, conventional, data path,
repeat), so a change in machine load hits all of them alike; ratios are medians of the
per-repeat ratios.
"""

from __future__ import annotations

import dataclasses
import itertools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, RandomSampler
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import (
    Options,
    Timed,
    fmt,
    load_images,
    machine,
    md_table,
    summary,
    sync,
    timed,
    write,
)
from contrastive_cli.builder import build_training
from contrastive_cli.callbacks.progress import ProgressBar
from contrastive_cli.config import build
from contrastive_cli.data.augment import Augment
from contrastive_cli.data.batches import InMemoryBatches, derive_seed
from contrastive_cli.data.datasets import ImageData
from contrastive_cli.device import Runtime, cpu_flags, device_has_native_bf16
from contrastive_cli.parts import build_encoder, seed_everything
from contrastive_cli.train import Progress, train

NAME = "throughput"
TARGET_EPOCH_OVER_PURE = 1.15
TARGET_CONVENTIONAL_OVER_OURS = 4.0


# --------------------------------------------------------------------------- the three feeds
class FirstSteps:
    """The real batch stream cut to its first ``steps`` batches: a partial epoch."""

    def __init__(self, batches: InMemoryBatches, steps: int):
        self.batches, self.steps, self.batch_size = batches, steps, batches.batch_size

    def __len__(self) -> int:
        return self.steps

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[Tensor, Tensor | None]]:
        return itertools.islice(self.batches.epoch(epoch, start), self.steps - start)


class Replay:
    """Pre-augmented views, replayed: the batch stream and the augmentation in one object.

    ``epoch`` yields placeholders (no indexing); calling it as the augmentation returns the
    next stored view, so the training loop runs unchanged on views made in advance.
    """

    def __init__(
        self, views: list[tuple[Tensor, Tensor, Tensor | None]], steps: int, batch_size: int
    ):
        self.stored, self.steps, self.batch_size = views, steps, batch_size
        self._next = itertools.cycle(v for v1, v2, _ in views for v in (v1, v2))

    def __len__(self) -> int:
        return self.steps

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[Tensor, Tensor | None]]:
        for i in range(start, self.steps):
            v1, _, labels = self.stored[i % len(self.stored)]
            yield v1, labels

    def __call__(self, images: Tensor, generator: torch.Generator) -> Tensor:
        return next(self._next)

    def views(
        self, images: Tensor, generator: torch.Generator, rows: object = None
    ) -> list[Tensor]:
        return [self(images, generator), self(images, generator)]


class PerSampleViews(Dataset):
    """Conventional: one image at a time, as PIL, through a torchvision transform, twice."""

    def __init__(self, images: Tensor, labels: Tensor, transform: Any):
        array = images.numpy()
        self.images = array[:, 0] if array.shape[1] == 1 else array.transpose(0, 2, 3, 1)
        self.labels = labels.numpy()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor, int]:
        image = Image.fromarray(np.ascontiguousarray(self.images[i]))
        return self.transform(image), self.transform(image), int(self.labels[i])


class LoaderBatches:
    """A DataLoader of (view1, view2, label) as a batch stream; ``PairViews`` hands the loop
    the two views the workers made, so ``train`` runs unchanged."""

    def __init__(self, loader: DataLoader, steps: int, device: torch.device):
        self.loader, self.steps, self.batch_size, self.device = (
            loader,
            steps,
            loader.batch_size,
            device,
        )

    def __len__(self) -> int:
        return self.steps

    def epoch(self, epoch: int, start: int = 0) -> Iterator[tuple[tuple[Tensor, Tensor], Tensor]]:
        for v1, v2, labels in itertools.islice(self.loader, self.steps - start):
            move = {"device": self.device, "non_blocking": True}
            yield (v1.to(**move), v2.to(**move)), labels.to(**move)


class PairViews:
    def __init__(self) -> None:
        self.which = 0

    def __call__(self, pair: tuple[Tensor, Tensor], generator: torch.Generator) -> Tensor:
        view, self.which = pair[self.which], 1 - self.which
        return view

    def views(
        self, pair: tuple[Tensor, Tensor], generator: torch.Generator, rows: object = None
    ) -> list[Tensor]:
        return list(pair)


def torchvision_transform(recipe: Augment, channels: int, size: int) -> Any:
    """Our augmentation recipe (``data.augment``) as the usual torchvision pipeline on PIL."""
    from torchvision import transforms as T

    steps: list[Any] = [T.RandomResizedCrop(size, scale=recipe.crop_scale, ratio=recipe.crop_ratio)]
    if recipe.hflip > 0:
        steps.append(T.RandomHorizontalFlip(recipe.hflip))
    if recipe.rotate > 0 or recipe.translate > 0:
        steps.append(
            T.RandomAffine(
                recipe.rotate, translate=(recipe.translate,) * 2 if recipe.translate else None
            )
        )
    if recipe.jitter_p > 0:
        colour = channels == 3
        jitter = T.ColorJitter(
            recipe.brightness,
            recipe.contrast,
            recipe.saturation if colour else 0,
            recipe.hue if colour else 0,
        )
        steps.append(T.RandomApply([jitter], p=recipe.jitter_p))
    if recipe.grayscale_p > 0 and channels == 3:
        steps.append(T.RandomGrayscale(recipe.grayscale_p))
    if recipe.blur_p > 0:
        kernel = max(3, int(0.1 * size) // 2 * 2 + 1)
        steps.append(T.RandomApply([T.GaussianBlur(kernel, recipe.blur_sigma)], p=recipe.blur_p))
    if recipe.solarize_p > 0:
        steps.append(T.RandomSolarize(128, p=recipe.solarize_p))
    steps += [T.ToTensor(), T.Normalize(recipe.mean, recipe.std)]
    return T.Compose(steps)


def conventional_loader(
    data: ImageData,
    augment: Augment,
    cfg: DictConfig,
    batch_size: int,
    steps: int,
    workers: int,
    device: torch.device,
) -> DataLoader:
    """The peers' pipeline: ``steps`` batches per epoch of per-sample transforms in workers."""
    return DataLoader(
        PerSampleViews(
            data.pretrain.images,
            data.pretrain.labels,
            torchvision_transform(augment, cfg.data.channels, cfg.data.image_size),
        ),
        batch_size=batch_size,
        drop_last=True,
        num_workers=workers,
        sampler=RandomSampler(
            range(len(data.pretrain)),
            num_samples=steps * batch_size,
            generator=torch.Generator().manual_seed(cfg.trainer.seed),
        ),
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
    )


# --------------------------------------------------------------------------- FLOP/s
def step_flops(method: torch.nn.Module, view1: Tensor, view2: Tensor, labels: Any) -> int:
    """FLOPs of one training step's forward and backward (matrix products and convolutions,
    as torch.utils.flop_counter counts them: 2 per multiply-add), on the eager method."""
    counter = FlopCounterMode(display=False)
    with counter:
        method([view1, view2], labels).backward()
    method.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def cpu_peak(cores: int) -> dict[str, Any]:
    """The CPU's peak GFLOP/s, fp32 and bf16: cores x clock x FLOPs per cycle per core of the
    widest instructions torch uses here. Assumes two FMA units per core (AMD Zen 4 runs
    AVX-512 as two 256-bit halves: half the AVX-512 figure). bf16: AMX tiles 1024 FLOPs per
    cycle (Intel's figure), AVX512-BF16 dot products 128; without native bf16, fp32's."""
    flags = cpu_flags()
    isa = torch.backends.cpu.get_cpu_capability()  # "AVX512", "AVX2", "DEFAULT", ...
    fp32 = {"AVX512": 64, "AVX2": 32}.get(isa, 8)  # 2 FMA x lanes x 2 FLOPs
    bf16 = 1024 if "amx_bf16" in flags else 128 if "avx512_bf16" in flags else fp32
    ghz, source = _clock_ghz()
    return {
        "cores": cores,
        "ghz": ghz,
        "clock_source": source,
        "isa": isa + (" + AMX-BF16" if "amx_bf16" in flags else ""),
        "fp32_flops_per_cycle": fp32,
        "bf16_flops_per_cycle": bf16,
        "fp32_gflops": cores * ghz * fp32,
        "bf16_gflops": cores * ghz * bf16,
        "assumption": f"{cores} cores x {ghz:.2f} GHz ({source}) x {fp32} fp32 / {bf16} bf16 "
        f"FLOPs per cycle ({isa}{', AMX' if 'amx_bf16' in flags else ''}; two FMA units "
        "per core assumed)",
    }


def _clock_ghz() -> tuple[float, str]:
    """The maximum clock when the kernel exposes it, else the current one from /proc/cpuinfo."""
    try:
        khz = Path("/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq").read_text()
        return int(khz) / 1e6, "cpuinfo_max_freq"
    except (OSError, ValueError):
        pass
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("cpu MHz"):
                return float(line.split(":")[1]) / 1000, "/proc/cpuinfo cpu MHz"
    except (OSError, ValueError):
        pass
    return 0.0, "unknown"


# --------------------------------------------------------------------------- one loss
def run_epoch(parts: Any, batches: Any, augment: Any, runtime: Runtime, cfg: DictConfig) -> None:
    """One (partial) epoch of the real training loop. The one place that calls ``train``."""
    train(
        parts._replace(batches=batches),
        augment,
        runtime,
        1,
        cfg.trainer.seed,
        Progress(),
        [ProgressBar(cfg.trainer.log_every)],
        cfg.trainer.grad_clip,
    )


def measure_loss(opts: Options, loss: str, data: ImageData, steps: int) -> dict[str, Any]:
    overrides = [f"loss={loss}"] + (["trainer.batch_size=32"] if opts.quick else [])
    cfg = opts.config(*overrides)
    seed_everything(cfg.trainer.seed, cfg.trainer.deterministic)
    runtime: Runtime = build(cfg.device)
    if runtime.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(runtime.device)
    augment: Augment = build(cfg.data.augment)
    parts = build_training(cfg, runtime, data, build_encoder(cfg, cfg.trainer.seed))
    batch_size = parts.batches.batch_size
    steps = min(steps or len(parts.batches), len(parts.batches))

    # Views for the pure model cost: made once, with the same augmentation, on the device.
    generator = torch.Generator(device=runtime.device)
    views = []
    for i, (images, labels) in enumerate(FirstSteps(parts.batches, min(steps, 4)).epoch(0)):
        generator.manual_seed(derive_seed(cfg.trainer.seed, "augment", i))
        views.append((augment(images, generator), augment(images, generator), labels))

    loader = conventional_loader(
        data, augment, cfg, batch_size, steps, opts.workers, runtime.device
    )
    # The pure model cost at the other precision too, where the device has native bf16.
    precision = "bf16" if runtime.autocast else "fp32"
    runtimes = {precision: runtime}
    if device_has_native_bf16(runtime.device):
        other = "fp32" if runtime.autocast else "bf16"
        runtimes[other] = dataclasses.replace(runtime, autocast=not runtime.autocast)
    pure_modes = {p: "pure" if p == precision else f"pure_{p}" for p in runtimes}

    def feeds(n: int) -> dict[str, tuple[Any, Any, Runtime]]:
        out: dict[str, tuple[Any, Any, Runtime]] = {
            "contrast": (FirstSteps(parts.batches, n), augment, runtime),
            "pure": (*(Replay(views, n, batch_size),) * 2, runtime),
            "conventional": (LoaderBatches(loader, n, runtime.device), PairViews(), runtime),
        }
        for p, mode in pure_modes.items():
            if mode != "pure":
                out[mode] = (*(Replay(views, n, batch_size),) * 2, runtimes[p])
        return out

    def data_path(n: int) -> None:
        """The batch stream and two augmented views, no model: what contrast adds to pure."""
        for i, (images, _) in enumerate(FirstSteps(parts.batches, n).epoch(0)):
            generator.manual_seed(derive_seed(cfg.trainer.seed, "augment", i))
            augment(images, generator), augment(images, generator)
        sync(runtime.device)

    # Warm-up: kernels, allocator, torch.compile, the DataLoader's workers (started here and
    # kept: worker start-up is left out of the conventional time, in its favour).
    for batches, aug, rt in feeds(min(steps, 3)).values():
        run_epoch(parts, batches, aug, rt, cfg)
    data_path(min(steps, 3))
    v1, v2, labels = views[0]
    flops = step_flops(parts.method, v1, v2, labels)

    runs: dict[str, list[Timed]] = {m: [] for m in (*feeds(0), "data_path")}
    for _ in range(opts.repeats):
        for mode, (batches, aug, rt) in feeds(steps).items():
            runs[mode].append(
                timed(lambda b=batches, a=aug, r=rt: run_epoch(parts, b, a, r, cfg), runtime.device)
            )
        runs["data_path"].append(timed(lambda: data_path(steps), runtime.device))

    images = steps * batch_size
    out: dict[str, Any] = {
        "loss": loss,
        "device": runtime.describe(),
        "batch_size": batch_size,
        "steps": steps,
        "steps_per_epoch": len(parts.batches),
        "images_per_run": images,
        "encoder": cfg.encoder._target_.rsplit(".", 1)[-1],
        "data": f"{cfg.data.name} ({cfg.data.channels}x{cfg.data.image_size}x{cfg.data.image_size})",
        # the largest GPU memory the tensors of any feed held (None off CUDA)
        "peak_gpu_mib": torch.cuda.max_memory_allocated(runtime.device) / 2**20
        if runtime.device.type == "cuda"
        else None,
    }
    for mode, timings in runs.items():
        seconds = [t.wall_s for t in timings]
        out[mode] = {
            "seconds": summary(seconds),
            "cpu_seconds": summary([t.cpu_s for t in timings]),
            "images_per_s": summary([images / s for s in seconds]),
            "epoch_s": summary([s / steps * len(parts.batches) for s in seconds]),
        }
    # Achieved GFLOP/s of the training step (pure model runs) beside the CPU's peak.
    out["flops_per_step"] = flops
    out["gflops"] = {
        p: summary([flops * steps / t.wall_s / 1e9 for t in runs[mode]])
        for p, mode in pure_modes.items()
    }
    out["peak"] = (
        cpu_peak(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1)
        if runtime.device.type == "cpu"
        else None
    )
    pairs = list(zip(runs["contrast"], runs["pure"], runs["conventional"], strict=True))
    out["epoch_over_pure"] = summary([c.wall_s / p.wall_s for c, p, _ in pairs])
    out["epoch_over_pure_cpu"] = summary([c.cpu_s / p.cpu_s for c, p, _ in pairs])
    out["conventional_over_contrast"] = summary([v.wall_s / c.wall_s for c, _, v in pairs])
    out["data_path_share"] = summary(
        [d.wall_s / c.wall_s for d, (c, _, _) in zip(runs["data_path"], pairs, strict=True)]
    )
    out["meets_epoch_target"] = out["epoch_over_pure"]["median"] <= TARGET_EPOCH_OVER_PURE
    out["meets_conventional_target"] = (
        out["conventional_over_contrast"]["median"] >= TARGET_CONVENTIONAL_OVER_OURS
    )
    return out


# --------------------------------------------------------------------------- entry point
def gflops_cell(r: dict[str, Any], precision: str) -> str:
    if precision not in r["gflops"]:
        return "-"
    g = r["gflops"][precision]
    peak = r["peak"][f"{precision}_gflops"] if r["peak"] else 0
    return fmt(g, 1) + (f" ({g['median'] / peak:.1%})" if peak else "")


def run(opts: Options) -> dict[str, Any]:
    started = machine()
    cfg = opts.config()
    data, source = load_images(opts, cfg, size=2048 if opts.quick else None)
    steps = opts.steps
    results = [measure_loss(opts, loss, data, steps) for loss in opts.losses]

    rows = []
    for r in results:
        rows.append(
            [
                r["loss"],
                fmt(r["contrast"]["epoch_s"], 1),
                fmt(r["contrast"]["images_per_s"], 0),
                fmt(r["pure"]["images_per_s"], 0),
                fmt(r["epoch_over_pure"], 3),
                fmt(r["epoch_over_pure_cpu"], 3),
                fmt(r["conventional"]["images_per_s"], 0),
                fmt(r["conventional_over_contrast"], 2),
                fmt(r["data_path"]["seconds"], 1, 1000 / r["steps"]),
                f"{r['flops_per_step'] / 1e9:.2f}",
                *(gflops_cell(r, p) for p in ("fp32", "bf16")),
            ]
        )
    table = md_table(
        [
            "loss",
            "contrast epoch s (est.)",
            "contrast img/s",
            "pure model img/s",
            "epoch / pure",
            "epoch / pure, CPU time",
            "conventional img/s",
            "conventional / contrast",
            "data path ms/step",
            "GFLOP/step",
            "pure GFLOP/s fp32 (of peak)",
            "pure GFLOP/s bf16 (of peak)",
        ],
        rows,
    )
    r0 = results[0]
    notes = [
        f"Data: {source}; shapes and data.augment of data={r0['data']}; encoder {r0['encoder']}; "
        f"batch {r0['batch_size']}; "
        f"device {r0['device']}. Each run is a partial epoch of {r0['steps']} steps "
        f"({r0['images_per_run']:,} images) of `contrastive_cli.train.train`; 'epoch s' extrapolates "
        f"to the full {r0['steps_per_epoch']} steps. {opts.repeats} runs each after a warm-up.",
        "pure model: the same loop on views augmented in advance (no augmentation, no indexing). "
        "conventional: torchvision per-sample transforms on PIL images in a DataLoader with "
        f"{opts.workers} persistent workers (start-up excluded), feeding the same method and loss.",
        "data path: the batch stream plus two augmented views per step without the model "
        "(what contrast adds to the pure model cost). 'CPU time' ratios use this process's CPU "
        "seconds instead of wall time: less sensitive to other programs on a busy machine.",
        "GFLOP/s: the training step's matrix-product and convolution FLOPs (forward + backward, "
        "counted once by torch.utils.flop_counter.FlopCounterMode; elementwise work is not "
        "counted) per second of the pure model runs, at the configured precision and, where the "
        "device has native bf16, the other one (autocast)."
        + (
            f" Peak: {r0['peak']['assumption']}: {r0['peak']['fp32_gflops']:,.0f} fp32 / "
            f"{r0['peak']['bf16_gflops']:,.0f} bf16 GFLOP/s; torch used "
            f"{torch.get_num_threads()} threads."
            if r0["peak"]
            else ""
        ),
    ]
    for r in results:
        e, v = r["epoch_over_pure"]["median"], r["conventional_over_contrast"]["median"]
        if not r["meets_epoch_target"]:
            notes.append(
                f"{r['loss']}: epoch / pure = {e:.3f}, above the {TARGET_EPOCH_OVER_PURE} target by "
                f"{e - TARGET_EPOCH_OVER_PURE:.3f}; the data path takes "
                f"{r['data_path_share']['median']:.0%} of contrast's epoch."
            )
        if not r["meets_conventional_target"]:
            notes.append(
                f"{r['loss']}: conventional / contrast = {v:.2f}, below the "
                f"{TARGET_CONVENTIONAL_OVER_OURS}x target by {TARGET_CONVENTIONAL_OVER_OURS - v:.2f}."
            )
    if all(r["meets_epoch_target"] and r["meets_conventional_target"] for r in results):
        notes.append(
            f"Targets met for every loss: epoch <= {TARGET_EPOCH_OVER_PURE}x the pure model, "
            f"conventional >= {TARGET_CONVENTIONAL_OVER_OURS}x slower."
        )
    settings = {
        "data": source,
        "steps": r0["steps"],
        "repeats": opts.repeats,
        "workers": opts.workers,
        "device": r0["device"],
        "compile": opts.compile,
        "quick": opts.quick,
        "targets": {
            "epoch_over_pure_max": TARGET_EPOCH_OVER_PURE,
            "conventional_over_contrast_min": TARGET_CONVENTIONAL_OVER_OURS,
        },
    }
    path = write(
        opts,
        NAME,
        "Training throughput (images/s, per loss)",
        started,
        settings,
        results,
        table,
        notes,
    )
    return {"path": str(path), "results": results}

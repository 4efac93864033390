"""The pure model step of every shipped encoder at its image size: fp32 and bf16 images/s,
GFLOP/s against the machine's peak, peak memory, and the real loop's epoch / pure ratio.

Each encoder runs in a fresh process (``python -m benchmarks.encoders ONE ...``) so that its
peak resident memory is its own. The step: ``loss=ntxent`` around the encoder (its
projector and loss are part of the step), the optimizer of the default config, views
augmented in advance (pure); the same method in the real ``train`` loop (batch stream,
augmentation on the fly, the finiteness check) for the epoch / pure ratio.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    Options,
    fmt,
    machine,
    md_table,
    summary,
    sync,
    timed,
    write,
)

# encoder -> (data option giving its channels and natural image size on this CPU, batch)
ENCODERS = {
    "cnn": ("fashion_mnist", 256),
    "mlp": ("fashion_mnist", 256),
    "resnet18": ("fashion_mnist", 16),
    "resnet50": ("cifar10", 8),
    "vit_tiny": ("cifar10", 16),
    "vit_small": ("cifar10", 8),
    "convnext_tiny": ("cifar10", 8),
}


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _pure(method: Any, optimizer: Any, views: list, steps: int, bf16: bool, device: Any) -> None:
    ctx = (
        (lambda: torch.autocast(device.type, dtype=torch.bfloat16))
        if bf16
        else contextlib.nullcontext
    )
    for _ in range(steps):
        with ctx():
            loss = method(views, None)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def measure_one(
    encoder: str, data_option: str, batch: int, steps: int, repeats: int, device: str
) -> dict[str, Any]:
    """One encoder, in this process: what the parent's table shows."""
    from benchmarks.common import _synthetic
    from benchmarks.throughput import cpu_peak, step_flops
    from contrastive_cli.builder import build_run, train_steps
    from contrastive_cli.config import compose
    from contrastive_cli.data.datasets import ImageData, Split
    from contrastive_cli.models.encoders import num_parameters

    cfg = compose(
        [
            f"encoder={encoder}",
            f"data={data_option}",
            "loss=ntxent",
            f"device={device}",
            "device.precision=fp32",
            f"trainer.batch_size={batch}",
            "eval.every=0",
        ]
    )
    full = _synthetic(cfg)
    n = batch * (steps + 1)
    split = Split(full.train.images[:n].clone(), full.train.labels[:n].clone())
    data = ImageData(pretrain=split, train=split, test=split, num_classes=10)
    rss_before = _rss_mib()
    built = build_run(cfg, data=data)
    rt = built.runtime
    method, optimizer = built.training.method, built.training.optimizer
    images = next(iter(built.training.batches.epoch(0)))[0]
    g = torch.Generator(device=rt.device).manual_seed(0)
    views = [built.augment(images, g), built.augment(images, g)]
    if rt.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(rt.device)
    _pure(method, optimizer, views, 1, False, rt.device)  # warm-up
    fp32 = [timed(lambda: _pure(method, optimizer, views, steps, False, rt.device), rt.device)]
    fp32 += [
        timed(lambda: _pure(method, optimizer, views, steps, False, rt.device), rt.device)
        for _ in range(repeats - 1)
    ]
    peak = (
        torch.cuda.max_memory_allocated(rt.device) / 2**20
        if rt.device.type == "cuda"
        else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss_before
    )
    train_steps(built, 1, 1, 0)  # warm-up of the loop
    loop = [timed(lambda: train_steps(built, steps, 1, 0), rt.device) for _ in range(repeats)]
    # bf16: one step after a warm-up step (emulated bf16 is ~10x slower on a CPU without it)
    _pure(method, optimizer, views, 1, True, rt.device)
    bf16 = [timed(lambda: _pure(method, optimizer, views, 1, True, rt.device), rt.device)]
    flops = step_flops(method, views[0], views[1], None)
    sync(rt.device)
    per = steps * batch
    return {
        "encoder": encoder,
        "image": f"{cfg.data.channels}x{cfg.data.image_size}x{cfg.data.image_size}",
        "params_m": num_parameters(method.encoder) / 1e6,
        "out_dim": int(method.encoder.out_dim),
        "batch": batch,
        "steps": steps,
        "device": rt.describe(),
        "flops_per_step": flops,
        "images_per_s": {
            "fp32": summary([per / t.wall_s for t in fp32]),
            "bf16": summary([batch / t.wall_s for t in bf16]),
        },
        "gflops": {
            "fp32": summary([flops * steps / t.wall_s / 1e9 for t in fp32]),
            "bf16": summary([flops / t.wall_s / 1e9 for t in bf16]),
        },
        "epoch_over_pure": summary(
            [lp.wall_s / p.wall_s for lp, p in zip(loop, fp32, strict=True)]
        ),
        "peak_mib": peak,
        "peak_kind": "CUDA max_memory_allocated"
        if rt.device.type == "cuda"
        else "peak RSS above the RSS before building",
        "peak": cpu_peak(len(os.sched_getaffinity(0))) if rt.device.type == "cpu" else None,
    }


def _in_subprocess(args: list[str], threads: int | None) -> dict[str, Any]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "benchmarks.encoders", "ONE", *args, str(threads or 0)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _cell(r: dict[str, Any], p: str) -> str:
    g = r["gflops"][p]
    peak = r["peak"][f"{p}_gflops"] if r["peak"] else 0
    return fmt(g, 1) + (f" ({g['median'] / peak:.1%})" if peak else "")


def run(opts: Options) -> dict[str, Any]:
    started = machine()
    steps = 1 if opts.quick else 2
    repeats = 1 if opts.quick else 3
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() and opts.device != "cpu" else [])
    results: list[dict[str, Any]] = []
    path = None
    for device in devices:
        for name in opts.extra.get("encoders", ENCODERS):
            data, batch = ENCODERS[name]
            batch = 4 if opts.quick else batch
            print(f"[bench] encoders: {name} on {device}", flush=True)
            args = [name, data, str(batch), str(steps), str(repeats), device]
            results.append(_in_subprocess(args, opts.threads))
            # written after each encoder: an interrupted run keeps what it measured
            path = _report(opts, started, results, steps, repeats, devices)
    return {"path": path, "results": results}


def _report(
    opts: Options,
    started: dict[str, Any],
    results: list[dict[str, Any]],
    steps: int,
    repeats: int,
    devices: list[str],
) -> Any:
    rows = [
        [
            r["encoder"],
            r["device"].split(" ")[0],
            r["image"],
            f"{r['params_m']:.1f}",
            r["out_dim"],
            r["batch"],
            f"{r['flops_per_step'] / r['batch'] / 1e9:.3f}",
            fmt(r["images_per_s"]["fp32"], 1),
            _cell(r, "fp32"),
            fmt(r["images_per_s"]["bf16"], 1),
            _cell(r, "bf16"),
            f"{r['peak_mib']:,.0f}",
            fmt(r["epoch_over_pure"], 2),
        ]
        for r in results
    ]
    header = [
        "encoder",
        "device",
        "image",
        "params (M)",
        "features",
        "batch",
        "GFLOP/image/step",
        "img/s fp32",
        "GFLOP/s fp32 (of peak)",
        "img/s bf16",
        "GFLOP/s bf16 (of peak)",
        "peak MiB",
        "epoch / pure",
    ]
    r0 = results[0]
    peak = r0["peak"]
    notes = [
        "Pure model step: loss=ntxent (projector + loss) around the encoder, the default "
        "optimizer (Adam), forward + backward + optimizer step on two views augmented in "
        f"advance; {steps} steps per run, {repeats} runs after a warm-up step, median (min-max).",
        "Batches are small for the large encoders (8-16): a 2-core CPU takes seconds per step.",
        "bf16: the same step under torch.autocast(bfloat16), one step after a warm-up step. "
        + (
            "This CPU has no native bf16 units (no AVX512-BF16 or AMX): bf16 is emulated and "
            "is expected to be slower than fp32, not faster."
            if peak
            and "AMX" not in peak["isa"]
            and peak["bf16_flops_per_cycle"] == peak["fp32_flops_per_cycle"]
            else "Native bf16 on this device."
        ),
        "GFLOP/image/step: matrix-product and convolution FLOPs of one step (forward + backward, "
        "both views) per image, counted by torch.utils.flop_counter.FlopCounterMode.",
        (
            f"Peak: {peak['assumption']}: {peak['fp32_gflops']:,.0f} fp32 / "
            f"{peak['bf16_gflops']:,.0f} bf16 GFLOP/s (an estimate: the clock is the one "
            "reported, not a measured all-core turbo)."
            if peak
            else "No CPU peak (GPU run)."
        ),
        "Peak memory: on the CPU the process's peak RSS minus its RSS before the run was built "
        "(the model, optimizer state, activations of one step; each encoder in a fresh "
        "process); on CUDA torch.cuda.max_memory_allocated.",
        "epoch / pure: the real train loop (batch stream, augmentation on the fly, finiteness "
        "check, schedule) over the pure step, fp32, same batch.",
        "Image sizes: 1x28x28 (Fashion-MNIST) for cnn, mlp and resnet18; 3x32x32 (CIFAR-10) "
        "for the ResNet-50, ViT and ConvNeXt recipes (small-image stem, patch 4). Images "
        "are synthetic (speed does not depend on content).",
        "GPU lines appear only when a GPU is present.",
    ]
    settings = {"steps": steps, "repeats": repeats, "encoders": ENCODERS, "devices": devices}
    return write(
        opts,
        "encoders",
        "Encoders: the pure model step per shipped encoder",
        started,
        settings,
        results,
        md_table(header, rows),
        notes,
    )


if __name__ == "__main__":
    if sys.argv[1] == "ONE":
        name, data_option, batch, steps, repeats, device, threads = sys.argv[2:9]
        if int(threads):
            torch.set_num_threads(int(threads))
        out = measure_one(name, data_option, int(batch), int(steps), int(repeats), device)
        print(json.dumps(out))

"""``python -m benchmarks`` (``make bench``): run the benchmarks, write benchmarks/results/."""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import LOSSES, ORDER, RESULTS, Options

DEFAULT = ("throughput", "evaluation", "memory", "quality", "distributed", "encoders")


def parse(argv: list[str] | None = None) -> tuple[Options, list[str]]:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="contrast's benchmarks: training throughput against the pure model cost and a "
        "conventional per-sample DataLoader pipeline, evaluation speed, peak memory, and "
        "quality at fixed epoch and wall-clock budgets. Results: <out>/<name>.json and .md, "
        "and <out>/README.md with every table.",
    )
    p.add_argument(
        "names",
        nargs="*",
        metavar="NAME",
        help=f"benchmarks to run, of {', '.join(ORDER)} (default: all)",
    )
    p.add_argument(
        "--only", default="", help="comma-separated benchmarks to run (same as NAME ...)"
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny sizes (a smoke test, seconds; numbers mean nothing); writes to results/quick/",
    )
    p.add_argument("--out", type=Path, default=None, help=f"output folder (default {RESULTS})")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"])
    p.add_argument(
        "--data",
        default="auto",
        choices=["auto", "fashion_mnist", "digits", "synthetic"],
        help="auto: Fashion-MNIST when present, else digits upsampled to 28x28",
    )
    p.add_argument("--losses", default=",".join(LOSSES), help="comma-separated losses")
    p.add_argument(
        "--repeats", type=int, default=None, help="measured runs per number (default 5; quick 1)"
    )
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="optimizer steps per measured partial epoch; 0: full epochs (default 30; quick 3)",
    )
    p.add_argument(
        "--workers", type=int, default=2, help="DataLoader workers of the conventional pipeline"
    )
    p.add_argument(
        "--compile", action="store_true", help="device.compile=true (torch.compile the method)"
    )
    p.add_argument(
        "--epochs", type=int, default=None, help="quality: fixed epoch budget (default 5)"
    )
    p.add_argument(
        "--minutes",
        type=float,
        default=None,
        help="quality: fixed training-time budget per loss in minutes (default 5)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch intra-op threads (default: torch's choice, one per core)",
    )
    p.add_argument(
        "--encoder",
        default=None,
        metavar="PATH",
        help="evaluation: encoder.safetensors of a cnn run to extract features with (default: random init)",
    )
    p.add_argument(
        "--encoders",
        default="",
        help="encoders: comma-separated shipped encoders to measure, in this order (default: all)",
    )
    p.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra config override for every run (repeatable)",
    )
    args = p.parse_args(argv)
    names = [n for n in (*args.names, *filter(None, args.only.split(","))) if n] or list(DEFAULT)
    unknown = [n for n in names if n not in ORDER]
    if unknown:
        p.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(ORDER)}")
    losses = [loss for loss in args.losses.split(",") if loss]
    if not set(losses) <= set(LOSSES):
        p.error(f"--losses: choose from {', '.join(LOSSES)}")
    if args.encoders:
        from benchmarks.encoders import ENCODERS

        wrong = [e for e in args.encoders.split(",") if e not in ENCODERS]
        if wrong:
            p.error(f"--encoders {','.join(wrong)}: choose from {', '.join(ENCODERS)}")
    quick = args.quick
    opts = Options(
        out=args.out or (RESULTS / "quick" if quick else RESULTS),
        quick=quick,
        device=args.device,
        data=args.data,
        losses=losses,
        repeats=args.repeats or (1 if quick else 5),
        steps=args.steps if args.steps is not None else (3 if quick else 30),
        workers=args.workers,
        compile=args.compile,
        epochs=args.epochs or (1 if quick else 5),
        minutes=args.minutes if args.minutes is not None else (0.05 if quick else 5.0),
        threads=args.threads,
        overrides=args.override,
        extra={
            **({"encoder": args.encoder} if args.encoder else {}),
            **({"encoders": args.encoders.split(",")} if args.encoders else {}),
        },
    )
    return opts, [n for n in ORDER if n in names]


def main(argv: list[str] | None = None) -> int:
    opts, names = parse(argv)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    for name in names:
        start = time.perf_counter()
        print(f"[bench] {name} ...", flush=True)
        result = importlib.import_module(f"benchmarks.{name}").run(opts)
        print(
            f"[bench] {name}: {time.perf_counter() - start:.0f} s -> {result['path']}", flush=True
        )
    print(f"[bench] tables: {opts.out / 'README.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

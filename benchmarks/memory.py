"""Peak memory: contrast's training against the conventional pipeline, and a whole run.

Each case runs in its own subprocess, which the parent samples every 50 ms: the resident
set (RSS) and the proportional set (PSS: shared pages split between the processes sharing
them) summed over the process and its descendants (DataLoader workers share the dataset
with their parent copy-on-write, so summed RSS counts it several times and PSS does not).
``ru_maxrss`` (the kernel's largest single process) is kept in the JSON only: see NOT_MAXRSS.

Cases: ``baseline`` (Python with torch and contrast imported), ``contrast`` and
``conventional`` (training steps of the default method, ntxent, on Fashion-MNIST at the
default batch size, as in the throughput benchmark) and ``contrast train`` (the real CLI:
one epoch on Fashion-MNIST, then the k-NN and probe evaluation with its baselines).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.common import Options, load_images, machine, md_table, summary, write

NAME = "memory"
REPO = Path(__file__).resolve().parent.parent
PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


# --------------------------------------------------------------------------- sampling
def _tree(root: int) -> list[int]:
    """``root`` and its descendants, from /proc/<pid>/stat."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        parents.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += parents.get(pid, [])
    return found


def _rss_pss(pid: int) -> tuple[int, int]:
    """Bytes resident and proportional for one process (0, 0 once it has gone)."""
    try:
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except OSError:
        return 0, 0
    values = {}
    for line in rollup.splitlines()[1:]:
        key, _, rest = line.partition(":")
        if rest.strip().endswith("kB"):
            values[key] = int(rest.split()[0]) * 1024
    return values.get("Rss", 0), values.get("Pss", 0)


def measure(
    cmd: list[str],
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
    interval: float = 0.05,
) -> dict[str, Any]:
    """Run ``cmd``; peak RSS and PSS of its process tree, its ru_maxrss and wall time."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    peak = {"rss": 0, "pss": 0, "processes": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            tree = _tree(proc.pid)
            sizes = [_rss_pss(pid) for pid in tree]
            peak["rss"] = max(peak["rss"], sum(r for r, _ in sizes))
            peak["pss"] = max(peak["pss"], sum(p for _, p in sizes))
            peak["processes"] = max(peak["processes"], len(tree))
            done.wait(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output = proc.stdout.read() if proc.stdout else ""
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    done.set()
    sampler.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{output[-3000:]}")
    return {
        "peak_rss_mb": peak["rss"] / 2**20,
        "peak_pss_mb": peak["pss"] / 2**20,
        "ru_maxrss_mb": usage.ru_maxrss / 1024,
        "processes": peak["processes"],
        "seconds": time.perf_counter() - start,
    }


NOT_MAXRSS = (
    "The kernel's ru_maxrss (in the JSON) is not shown: a child forked from this large "
    "benchmark process starts its high-water mark at the parent's size, so it overstates."
)


def memory_table(results: list[dict[str, Any]]) -> str:
    def mb(s: dict[str, Any]) -> str:
        return f"{s['median']:,.0f}" + (
            f" ({s['min']:,.0f}-{s['max']:,.0f})" if s["min"] != s["max"] else ""
        )

    rows = [
        [r["case"], mb(r["peak_pss_mb"]), mb(r["peak_rss_mb"]), f"{r['processes']['max']:.0f}"]
        for r in results
    ]
    headers = [
        "case",
        "peak PSS MB (tree)",
        "peak RSS MB (tree, shared pages counted per process)",
        "processes",
    ]
    return md_table(headers, rows)


# --------------------------------------------------------------------------- the cases
def child(argv: list[str]) -> None:
    """``python -m benchmarks.memory <contrast|conventional> ...``: train, then exit."""
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["contrast", "conventional"])
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--data", default="auto")
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    from benchmarks.throughput import (
        FirstSteps,
        LoaderBatches,
        PairViews,
        conventional_loader,
        run_epoch,
    )
    from contrastive_cli.builder import build_training
    from contrastive_cli.config import build
    from contrastive_cli.parts import build_encoder, seed_everything

    opts = Options(quick=args.quick, device=args.device, data=args.data, workers=args.workers)
    cfg = opts.config("loss=ntxent", *(["trainer.batch_size=32"] if args.quick else []))
    seed_everything(cfg.trainer.seed, cfg.trainer.deterministic)
    runtime = build(cfg.device)
    augment = build(cfg.data.augment)
    data, _ = load_images(opts, cfg, size=2048 if args.quick else None)
    parts = build_training(cfg, runtime, data, build_encoder(cfg, cfg.trainer.seed))
    batch_size = parts.batches.batch_size
    if args.mode == "contrast":
        run_epoch(parts, FirstSteps(parts.batches, args.steps), augment, runtime, cfg)
    else:
        loader = conventional_loader(
            data, augment, cfg, batch_size, args.steps, args.workers, runtime.device
        )
        run_epoch(
            parts, LoaderBatches(loader, args.steps, runtime.device), PairViews(), runtime, cfg
        )


def run(opts: Options) -> dict[str, Any]:
    started = machine()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(
            os.pathsep
        ),
    }
    if opts.threads:
        env["OMP_NUM_THREADS"] = str(opts.threads)
    py = sys.executable
    steps = opts.steps or 234
    common = [
        "--steps",
        str(steps),
        "--workers",
        str(opts.workers),
        "--device",
        opts.device,
        "--data",
        opts.data,
    ]
    common += ["--quick"] if opts.quick else []
    cases: dict[str, list[str]] = {
        "baseline (python + torch + contrast imported)": [
            py,
            "-c",
            "import torch, contrastive_cli.run",
        ],
        "contrast: training steps": [py, "-m", "benchmarks.memory", "contrast", *common],
        f"conventional: training steps, {opts.workers} workers": [
            py,
            "-m",
            "benchmarks.memory",
            "conventional",
            *common,
        ],
    }
    with tempfile.TemporaryDirectory() as tmp:
        if not opts.quick:  # minutes: left out of the smoke test
            run_args = [
                "data=fashion_mnist",
                "trainer.epochs=1",
                f"device={opts.device}",
                *opts.overrides,
            ]
            cases[f"contrast train {' '.join(run_args)} (whole run)"] = [
                py,
                "-m",
                "contrastive_cli",
                "train",
                *run_args,
                f"hydra.run.dir={tmp}/run",
            ]
        repeats = 1 if opts.quick else min(opts.repeats, 3)
        results = []
        for name, cmd in cases.items():
            # The whole run takes minutes: measured once. The others are repeated.
            runs = [
                measure(cmd, env=env, cwd=Path(tmp))
                for _ in range(1 if "whole run" in name else repeats)
            ]
            results.append(
                {
                    "case": name,
                    "command": " ".join(cmd[1:]),
                    **{k: summary([r[k] for r in runs]) for k in runs[0]},
                }
            )

    table = memory_table(results)
    notes = [
        f"Training cases: ntxent, encoder=cnn, Fashion-MNIST (or the fallback), default batch size, "
        f"{steps} steps; conventional = torchvision per-sample transforms in a DataLoader with "
        f"{opts.workers} workers. Sampled every 50 ms, so short peaks can be missed.",
        "PSS splits pages shared between processes (the dataset the workers inherit) among them; "
        "it is the fair total for a process tree.",
        NOT_MAXRSS,
    ]
    settings = {
        "steps": steps,
        "workers": opts.workers,
        "repeats": repeats,
        "device": opts.device,
        "quick": opts.quick,
    }
    path = write(opts, NAME, "Peak memory", started, settings, results, table, notes)
    return {"path": str(path), "results": results}


if __name__ == "__main__":
    child(sys.argv[1:])

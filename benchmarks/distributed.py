"""Several processes on one machine: a training step on 1 process against N processes
(gloo on CPU, NCCL on GPUs), and what the all-gather and synchronised BatchNorm add.

Variants, all at the same global batch, the real ``build_run`` + ``train`` path:

- ``1 process``: the reference;
- ``N, local loss``: DDP, but each process's loss sees only its own rows and BatchNorm its
  own samples (what a naive DDP port does: a different, smaller-batch loss);
- ``N, gather``: the loss sees every process's embeddings (contrast's default for losses);
- ``N, gather + SyncBN``: and BatchNorm statistics of the global batch (the default).

The step time of a variant is the median over its measured steps of the wall time of
``train`` for ``--steps`` steps divided by the steps. Overheads are the differences.
"""

from __future__ import annotations

import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import Options, load_images, machine, write

NAME = "distributed"
WORLD = 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _steps(
    rank: int,
    world: int,
    overrides: list[str],
    steps: int,
    local: bool,
    data: str = "auto",
    size: int | None = None,
) -> float:
    """Seconds per step of ``steps`` real steps (after 3 warm-up steps) on this process, on
    the images of ``--data`` (``auto``: Fashion-MNIST when present, else digits at 28x28; the
    same fallback as the other benchmarks, so a machine without the dataset runs it too)."""
    from contrastive_cli.builder import build_run, train_steps
    from contrastive_cli.distributed import Dist, local_only

    opts = Options(data=data)
    cfg = opts.config(*overrides)
    images, _ = load_images(opts, cfg, size=size)
    d = Dist(rank, world, rank)
    built = build_run(cfg, d, data=images)
    method = built.training.method
    if local:  # a loss that sees only this process's rows
        method.gather = local_only
    timings: list[float] = []

    def run(n: int) -> float:
        start = time.perf_counter()
        train_steps(built, n, 1, 0, d)
        return (time.perf_counter() - start) / n

    run(3)
    for _ in range(3):
        timings.append(run(steps))
    return statistics.median(timings)


def _entry(
    rank: int,
    port: int,
    out: str,
    overrides: list[str],
    steps: int,
    local: bool,
    data: tuple[str, int | None],
) -> None:
    import torch.distributed as dist

    from contrastive_cli.distributed import leave_process_group

    torch.set_num_threads(max(1, torch.get_num_threads() // WORLD))
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    clean = False
    try:
        seconds = _steps(rank, WORLD, overrides, steps, local, *data)
        if rank == 0:
            Path(out).write_text(str(seconds))
        clean = True
    finally:
        leave_process_group(clean)  # a barrier, then the group freed (issue 23)


def _several(overrides: list[str], steps: int, local: bool, data: tuple[str, int | None]) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "seconds")
        torch.multiprocessing.spawn(
            _entry,
            args=(_free_port(), out, overrides, steps, local, data),
            nprocs=WORLD,
            join=True,
        )
        return float(Path(out).read_text())


def run(opts: Options) -> dict[str, Any]:
    started = machine()
    steps = 3 if opts.quick else opts.steps
    batch = ["trainer.batch_size=32"] if opts.quick else []
    base = ["loss=ntxent", "device=cpu", "eval.every=0", *batch]
    data = (opts.data, 2048 if opts.quick else None)
    variants = {
        "1 process": lambda: _steps(0, 1, base, steps, False, *data),
        f"{WORLD}, local loss, local BN": lambda: _several(
            [*base, "trainer.sync_bn=false"], steps, True, data
        ),
        f"{WORLD}, gather, local BN": lambda: _several(
            [*base, "trainer.sync_bn=false"], steps, False, data
        ),
        f"{WORLD}, gather + SyncBN": lambda: _several(base, steps, False, data),
    }
    seconds = {name: measure() for name, measure in variants.items()}
    batch_size = Options().config(*base).trainer.batch_size
    rows = [f"| {name} | {s * 1000:,.1f} | {batch_size / s:,.0f} |" for name, s in seconds.items()]
    names = list(seconds)
    gather_ms = (seconds[names[2]] - seconds[names[1]]) * 1000
    syncbn_ms = (seconds[names[3]] - seconds[names[2]]) * 1000
    table = "\n".join(
        [
            f"| ntxent, cnn, Fashion-MNIST shapes, global batch {batch_size} | ms/step | images/s |",
            "|---|---|---|",
            *rows,
        ]
    )
    notes = [
        f"all-gather of the embeddings (with its backward): {gather_ms:+.1f} ms/step",
        f"synchronised BatchNorm (two all-reduces per BatchNorm layer, forward and backward): "
        f"{syncbn_ms:+.1f} ms/step",
        f"{WORLD} CPU processes share the machine's cores (torch threads split between them).",
    ]
    settings = {"steps": steps, "world": WORLD, "overrides": base}
    results = {name: {"seconds_per_step": s} for name, s in seconds.items()}
    path = write(
        opts, NAME, "Several processes (seconds per step)", started, settings, results, table, notes
    )
    return {"path": path, "results": results}

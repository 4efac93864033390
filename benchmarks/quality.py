"""Quality: each loss on Fashion-MNIST at a fixed epoch budget and a fixed training-time budget.

Every number is taken from a real ``contrast train`` run's results.json (the evaluation
protocol of the package: k-NN k=200 and k=20, linear probe), beside the raw-pixel and
random-init baselines (evaluated once, in the first run: they do not depend on the loss).
The time budget is turned into epochs with the epoch time measured in the same loss's
fixed-epoch run (metrics.jsonl), so each time-budget run is a complete run with its own
learning-rate schedule; training time excludes evaluation. The per-epoch k-NN monitor and
checkpoints are switched off to save time; they do not change training.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchmarks.common import Options, machine, md_table, write

NAME = "quality"
REPO = Path(__file__).resolve().parent.parent
METRICS = ("knn_k200", "knn_k20", "linear_top1")
QUICK = [
    "data=digits",
    "trainer.batch_size=64",
    "eval.probe.max_iter=30",
    "eval.probe.weight_decays=[1e-4,1e-2]",
]


def train_run(
    opts: Options, loss: str, epochs: int, run_dir: Path, baselines: bool
) -> dict[str, Any]:
    """``contrast train`` in a subprocess; its results.json and per-epoch training times."""
    data = QUICK if opts.quick else ["data=fashion_mnist"]
    args = [
        *data,
        "encoder=cnn",
        f"loss={loss}",
        f"trainer.epochs={epochs}",
        f"device={opts.device}",
        "eval.every=0",
        "trainer.checkpoint=false",
        f"eval.baselines={str(baselines).lower()}",
        *opts.overrides,
        f"hydra.run.dir={run_dir}",
    ]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(
            os.pathsep
        ),
    }
    if opts.threads:
        env["OMP_NUM_THREADS"] = str(opts.threads)
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run, never a resumed or refused one
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [sys.executable, "-m", "contrastive_cli", "train", *args],
        env=env,
        cwd=run_dir.parent,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"contrast train {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
        )
    results = json.loads((run_dir / "results.json").read_text())
    epochs_log = [
        json.loads(line)
        for line in (run_dir / "metrics.jsonl").read_text().splitlines()
        if line.strip()
    ]
    return {
        "command": "contrast train " + " ".join(args[:-1]),
        "run_dir": str(run_dir),
        "epochs": epochs,
        "train_time_s": results["train_time_s"],
        "eval_time_s": results["eval_time_s"],
        "epoch_time_s": [e["epoch_time_s"] for e in epochs_log],
        "metrics": {k: results["metrics"][k] for k in METRICS if k in results["metrics"]},
        "baselines": {
            name: {k: m[k] for k in METRICS if k in m}
            for name, m in results.get("baselines", {}).items()
        },
    }


def run(opts: Options) -> dict[str, Any]:
    started = machine()
    runs_root = opts.out / "quality_runs"
    budget_s = opts.minutes * 60
    results: list[dict[str, Any]] = []
    baselines: dict[str, Any] = {}
    for i, loss in enumerate(opts.losses):
        fixed = train_run(
            opts, loss, opts.epochs, runs_root / f"epochs{opts.epochs}_{loss}", baselines=i == 0
        )
        baselines = baselines or fixed["baselines"]
        epoch_s = statistics.median(fixed["epoch_time_s"])
        budget_epochs = max(1, math.floor(budget_s / epoch_s))
        timed = (
            fixed
            if budget_epochs == opts.epochs
            else train_run(
                opts,
                loss,
                budget_epochs,
                runs_root / f"minutes{opts.minutes:g}_{loss}",
                baselines=False,
            )
        )
        results.append(
            {
                "loss": loss,
                "epoch_time_s": epoch_s,
                "fixed_epochs": fixed,
                "time_budget": {**timed, "budget_s": budget_s},
            }
        )

    def cells(m: dict[str, float]) -> list[str]:
        return [f"{m[k]:.4f}" if k in m else "-" for k in METRICS]

    rows = [[name.replace("_", " "), "-", "-", *cells(m)] for name, m in baselines.items()]
    for r in results:
        f, t = r["fixed_epochs"], r["time_budget"]
        rows.append(
            [
                f"{r['loss']}, {f['epochs']} epochs",
                f["epochs"],
                f"{f['train_time_s']:.0f}",
                *cells(f["metrics"]),
            ]
        )
        rows.append(
            [
                f"{r['loss']}, {opts.minutes:g} min",
                t["epochs"],
                f"{t['train_time_s']:.0f}",
                *cells(t["metrics"]),
            ]
        )
    table = md_table(["encoder", "epochs", "train s", "k-NN k=200", "k-NN k=20", "linear"], rows)
    data = "digits (quick)" if opts.quick else "Fashion-MNIST"
    notes = [
        f"{data}, encoder=cnn, default batch size and optimizer; one run per row, seed 0. "
        f"Fixed budget: {opts.epochs} epochs. Time budget: {opts.minutes:g} minutes of training per loss, "
        "as floor(budget / epoch time measured in the fixed-epoch run) epochs.",
        "Accuracies on the test split: k-NN (cosine, T=0.1) and the linear probe (weight decay chosen on "
        "a held-out part of train). Baselines from the first run: raw pixels and the same cnn randomly initialised.",
    ]
    settings = {
        "epochs": opts.epochs,
        "minutes": opts.minutes,
        "losses": list(opts.losses),
        "quick": opts.quick,
        "device": opts.device,
        "overrides": list(opts.overrides),
    }
    path = write(
        opts,
        NAME,
        "Quality at fixed budgets (test accuracy)",
        started,
        settings,
        {"baselines": baselines, "runs": results},
        table,
        notes,
    )
    return {"path": str(path), "results": results}

"""How well do the label-free metrics rank runs? A short Fashion-MNIST sweep, then the
Spearman correlation of each label-free metric with the linear probe's accuracy.

    python -m benchmarks.labelfree_study [--out DIR] [--epochs 2] [--images 10000]
        [--data fashion_mnist]

Each run trains in this process (one at a time, under ``nice``) the way ``contrast train``
does (``build_run``, the loop, the run's own evaluation), with the overrides below, on a
fixed subset of ``--images`` train images (pretraining and the probe's training set; the
test split whole); a run whose ``<name>.json`` exists in ``--out`` is kept (rerun the script
to resume). Writes ``labelfree_study.md`` (the runs and the correlations) into ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from contrastive_cli.builder import build_run, train_steps
from contrastive_cli.config import compose
from contrastive_cli.data.datasets import Split
from contrastive_cli.labelfree import projector_of
from contrastive_cli.parts import load_data
from contrastive_cli.validate import validate

# (name, overrides): losses x a few settings, including deliberately poor ones.
RUNS: list[tuple[str, list[str]]] = [
    ("ntxent", ["loss=ntxent"]),
    ("ntxent_1ep", ["loss=ntxent", "trainer.epochs=1"]),
    ("byol", ["loss=byol"]),
    ("byol_no_predictor", ["loss=byol", "loss.predictor=null"]),  # collapses (Grill et al.)
    ("ntxent_lr_too_high", ["loss=ntxent", "optim.lr=0.05"]),  # 50x the default
    ("barlow", ["loss=barlow"]),
    ("vicreg", ["loss=vicreg"]),
    ("simsiam", ["loss=simsiam"]),
    ("moco", ["loss=moco"]),
]
# The probe's grid, narrowed to keep each run's evaluation short on a shared 2-core CPU.
PROBE = ["eval.probe.weight_decays=[1e-5,1e-3]", "eval.probe.max_iter=100"]
LABEL_FREE = ("rankme", "rankme_projector", "alignment", "uniformity")
TARGET = "linear_top1"


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman's rho: Pearson's correlation of the ranks (ties get their mean rank)."""

    def ranks(v: list[float]) -> np.ndarray:
        a = np.asarray(v, dtype=float)
        order = a.argsort(kind="stable")
        r = np.empty(len(a))
        r[order] = np.arange(1, len(a) + 1)
        for value in np.unique(a):  # ties: mean rank
            r[a == value] = r[a == value].mean()
        return r

    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def subset(data: Any, n: int, seed: int = 0) -> Any:
    """The first ``n`` images of a fixed permutation of the train split: pretraining and the
    probe's training set (the test split is kept whole)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(data.train), generator=g)[:n]
    train = Split(data.train.images[idx], data.train.labels[idx])
    return dataclasses.replace(data, pretrain=train, train=train)


def train(out: Path, name: str, overrides: list[str], ns: argparse.Namespace) -> dict | None:
    """One run in this process (``build_run`` on the subset, the loop, the run's own
    evaluation): its metrics, also written to ``out/name.json`` (kept: a rerun resumes)."""
    results = out / f"{name}.json"
    if results.is_file():
        return json.loads(results.read_text())
    cfg = compose(
        [
            f"data={ns.data}",
            f"trainer.epochs={ns.epochs}",
            *overrides,
            "eval.metrics=[linear,rankme,alignment,uniformity]",
            "eval.baselines=false",
            *PROBE,
        ]
    )
    validate(cfg)
    print(f"{name}: {' '.join(overrides)}", flush=True)
    start = time.perf_counter()
    data = subset(load_data(cfg), ns.images)
    built = build_run(cfg, data=data)
    epochs = int(cfg.trainer.epochs)
    try:
        train_steps(built, epochs * len(built.training.batches), epochs, int(cfg.trainer.seed))
    except Exception as e:  # a diverged run is a result too: no metrics
        print(f"{name}: {type(e).__name__}: {e}", flush=True)
        return None
    method = built.training.method
    metrics, _, _ = built.evaluation(
        method.encoder, data, built.augment, built.runtime, projector_of(method)
    )
    metrics["seconds"] = time.perf_counter() - start
    results.write_text(json.dumps({"overrides": overrides, "metrics": metrics}, indent=1))
    print(f"{name}: {json.dumps(metrics)}", flush=True)
    return {"metrics": metrics}


def report(rows: list[tuple[str, list[str], dict]], epochs: int, data: str) -> str:
    keys = [TARGET, *LABEL_FREE]
    lines = [
        f"{len(rows)} runs, data={data}, {epochs} epochs unless overridden; the label-free "
        f"metrics of the encoder (projector for rankme_projector) on the fixed sample.",
        "",
        "| run | overrides | " + " | ".join(keys) + " |",
        "|---|---|" + "---|" * len(keys),
    ]
    for name, overrides, results in rows:
        m = results.get("metrics", {})
        cells = [f"{m[k]:.4f}" if k in m else "-" for k in keys]
        lines.append(f"| {name} | `{' '.join(overrides)}` | " + " | ".join(cells) + " |")
    lines += ["", f"| metric | Spearman rho with {TARGET} | runs |", "|---|---|---|"]
    for key in LABEL_FREE:
        pairs = [
            (r["metrics"][key], r["metrics"][TARGET]) for _, _, r in rows if key in r["metrics"]
        ]
        if len(pairs) >= 3:
            rho = spearman([p[0] for p in pairs], [p[1] for p in pairs])
            lines.append(f"| {key} | {rho:+.2f} | {len(pairs)} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.labelfree_study")
    parser.add_argument("--out", type=Path, default=Path("outputs/labelfree_study"))
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--images", type=int, default=10000, help="train images (a fixed subset)")
    parser.add_argument("--data", default="fashion_mnist")
    ns = parser.parse_args()
    ns.out.mkdir(parents=True, exist_ok=True)
    os.nice(10)  # the machine is shared
    rows = []
    for name, overrides in RUNS:
        results = train(ns.out, name, overrides, ns)
        if results and results.get("metrics"):
            rows.append((name, overrides, results))
            (ns.out / "labelfree_study.md").write_text(report(rows, ns.epochs, ns.data))
    text = report(rows, ns.epochs, ns.data)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

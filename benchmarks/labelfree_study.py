"""How well do the label-free metrics rank runs? A short Fashion-MNIST sweep, then the
Spearman correlation of each label-free metric with the linear probe's accuracy.

    python -m benchmarks.labelfree_study [--out DIR] [--epochs 2] [--data fashion_mnist]

Each run is ``contrast train`` (one at a time, under ``nice``) with the overrides below; a
run whose results.json exists is kept (rerun the script to resume). Writes
``labelfree_study.md`` (the runs and the correlations) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

# (name, overrides): losses x a few settings, including deliberately poor ones.
RUNS: list[tuple[str, list[str]]] = [
    ("ntxent", ["loss=ntxent"]),
    ("byol", ["loss=byol"]),
    ("byol_no_predictor", ["loss=byol", "loss.predictor=null"]),  # collapses (Grill et al.)
    ("ntxent_lr_too_high", ["loss=ntxent", "optim.lr=0.05"]),  # 50x the default
    ("barlow", ["loss=barlow"]),
    ("vicreg", ["loss=vicreg"]),
    ("simsiam", ["loss=simsiam"]),
    ("moco", ["loss=moco"]),
    ("ntxent_t1", ["loss=ntxent", "loss.temperature=1.0"]),  # a poor temperature
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


def train(out: Path, name: str, overrides: list[str], epochs: int, data: str) -> dict | None:
    run_dir = out / name
    results = run_dir / "results.json"
    if not results.is_file():
        command = [
            "nice",  # one level of nice: the runs share the machine
            sys.executable,
            "-m",
            "contrastive_cli",
            "train",
            f"data={data}",
            f"trainer.epochs={epochs}",
            *overrides,
            "eval.metrics=[linear,rankme,alignment,uniformity]",
            "eval.baselines=false",
            "eval.plots=false",
            "eval.every=0",
            *PROBE,
            f"hydra.run.dir={run_dir}",
        ]
        print(" ".join(command[1:]), flush=True)
        subprocess.run(command, check=False)
    if not results.is_file():
        return None
    return json.loads(results.read_text())


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
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--data", default="fashion_mnist")
    ns = parser.parse_args()
    ns.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, overrides in RUNS:
        results = train(ns.out, name, overrides, ns.epochs, ns.data)
        if results and results.get("metrics"):
            rows.append((name, overrides, results))
            (ns.out / "labelfree_study.md").write_text(report(rows, ns.epochs, ns.data))
    text = report(rows, ns.epochs, ns.data)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

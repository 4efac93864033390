"""``contrast reproduce RUN_DIR``: rerun a run's saved config in a new directory and compare."""

from __future__ import annotations

import argparse
import math
from datetime import datetime
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf, open_dict

from contrastive_cli.config import claim_directory
from contrastive_cli.errors import ConfigError
from contrastive_cli.rebuild import rebuild, saved_config
from contrastive_cli.rundirs import load_run
from contrastive_cli.signals import Interrupted
from contrastive_cli.starting import check_recorded
from contrastive_cli.untrusted import printable
from contrastive_cli.validate import validate

TIMINGS = {"seconds"}  # wall-clock numbers, never expected to repeat
HELP = "rerun RUN_DIR's saved config into a new run dir and report identical or the differences"


def compared_values(run_dir: Path) -> dict[str, float]:
    """The numbers a reproduction must match: per-epoch losses and k-NN, final metrics."""
    run = load_run(run_dir)
    values: dict[str, float] = {}
    for record in run.metrics():
        for key in ("loss", "knn"):
            if key in record:
                values[f"epoch {record['epoch']} {key}"] = float(record[key])
    results = run.results or {}
    sections = {"metrics": results.get("metrics") or {}}
    sections.update(
        {f"baselines.{name}": m for name, m in (results.get("baselines") or {}).items()}
    )
    for section, metrics in sections.items():
        for key, value in metrics.items():
            if key not in TIMINGS:
                values[f"{section}.{key}"] = float(value)
    return values


def differences(a: dict[str, float], b: dict[str, float]) -> list[tuple[str, Any, Any, float]]:
    """(name, original, reproduced, |difference|) for every value that is not bit-identical."""
    out = []
    for key in sorted(set(a) | set(b), key=lambda k: (k not in a, k)):
        va, vb = a.get(key), b.get(key)
        if va is None or vb is None:
            out.append((key, va, vb, math.inf))
        elif va != vb and not (math.isnan(va) and math.isnan(vb)):
            out.append((key, va, vb, abs(va - vb)))
    return out


def main(args: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="contrast reproduce", description=HELP)
    parser.add_argument("run_dir", type=Path)
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="directory for the new run (default: outputs/<date>/<time>_reproduce_<name>)",
    )
    parser.add_argument(
        "--tolerance",
        type=float,
        default=None,
        help="largest absolute difference accepted (default: 0 for a deterministic CPU "
        "run, else 0.01)",
    )
    ns = parser.parse_args(args)
    original = load_run(ns.run_dir)
    cfg = original.config()  # rebuilt from conf/ and the run's overrides: refused first if not
    if original.status != "completed":
        why = f" ({original.problem})" if original.problem else ""
        raise ConfigError(
            f"{original.path} has status {original.status!r}{why}; only completed runs can be "
            f"reproduced (use `contrast resume {original.path}` for interrupted ones)"
        )
    check_recorded(cfg, (original.results or {}).get("starting_weights"), "contrast reproduce")
    overrides = [*original.overrides, "eval.cache_baselines=false"]
    if cfg.trainer.time_budget is None and rebuild(original.overrides, "")[0].trainer.time_budget:
        # the epochs its time budget fixed, as a value: the rerun measures no budget
        overrides += [f"trainer.epochs={cfg.trainer.epochs}", "trainer.time_budget=null"]
    with open_dict(cfg):
        cfg.trainer.resume = False
        cfg.eval.cache_baselines = False  # recompute the baselines too: nothing is taken as given
    validate(cfg)  # before the new run directory exists: a refused reproduce leaves nothing
    now = datetime.now()
    out = Path(
        claim_directory(
            str(
                ns.out
                or Path("outputs")
                / now.strftime("%Y-%m-%d")
                / f"{now:%H-%M-%S}_reproduce_{original.path.name}"
            )
        )
    )
    (out / ".hydra").mkdir(parents=True, exist_ok=True)
    # The new run's record: the overrides it was rebuilt from, and what they gave.
    OmegaConf.save(OmegaConf.create(overrides), out / ".hydra" / "overrides.yaml")
    (out / ".hydra" / "config.yaml").write_text(saved_config(cfg))
    (out / "reproduces.txt").write_text(f"{original.path.resolve()}\n")

    from contrastive_cli.launch import run_job

    try:
        run_job(cfg, out, original.choices)
    except Interrupted as e:
        return e.exit_code
    deterministic_cpu = bool(cfg.trainer.deterministic) and "cpu" in str(
        (original.results or {}).get("device", "")
    )
    tolerance = ns.tolerance if ns.tolerance is not None else (0.0 if deterministic_cpu else 0.01)
    diffs = differences(compared_values(original.path), compared_values(out))
    print(f"\noriginal:   {original.path}\nreproduced: {out}")
    if not diffs:
        print(
            f"identical: all {len(compared_values(out))} per-epoch losses, k-NN values and final metrics "
            "are bit-identical"
        )
        return 0
    worst = max(d[3] for d in diffs)
    verdict = "within tolerance" if worst <= tolerance else "differs"
    print(
        f"{verdict}: {len(diffs)} values differ, largest |difference| {worst:.3g}, tolerance {tolerance:g}"
    )
    for key, a, b, d in diffs[:20]:
        print(f"  {printable(key):<40} {a!s:>22} {b!s:>22}  {d:.3g}")  # keys from run files
    if len(diffs) > 20:
        print(f"  ... and {len(diffs) - 20} more")
    return 0 if worst <= tolerance else 1

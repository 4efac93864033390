"""``python -m benchmarks.gpu_summary WORK STEPS OUT DEVICE``: the GPU check's summary.

Reads what ``benchmarks/gpu_check.sh`` left in WORK (throughput JSON per encoder and compile
setting, the real run and its reproduction) and the steps' exit codes, and writes
``OUT/summary.json`` and ``OUT/summary.md``: device, images/s, epoch / pure model, peak GPU
memory, the compile speed-up, and whether the deterministic rerun was bit-identical.
Numbers come only from those files; a missing one is reported as missing.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from contrastive_cli.commands.reproduce import compared_values, differences


def steps(path: Path) -> list[dict[str, Any]]:
    rows = []
    for line in path.read_text().splitlines():
        name, rc, seconds = line.split("\t")
        rows.append({"step": name, "exit": int(rc), "seconds": int(seconds)})
    return rows


def throughput(bench: Path) -> list[dict[str, Any]]:
    """One row per (encoder, compile, loss) from each throughput.json under ``bench``."""
    rows = []
    for path in sorted(bench.glob("throughput_*_compile_*/throughput.json")):
        _, encoder, _, compile_ = path.parent.name.split("_")
        for r in json.loads(path.read_text())["results"]:
            rows.append(
                {
                    "encoder": encoder,
                    "compile": compile_ == "on",
                    "loss": r["loss"],
                    "device": r["device"],
                    "data": r.get("data"),
                    "batch_size": r["batch_size"],
                    "images_per_s": r["contrast"]["images_per_s"]["median"],
                    "pure_images_per_s": r["pure"]["images_per_s"]["median"],
                    "epoch_over_pure": r["epoch_over_pure"]["median"],
                    "conventional_images_per_s": r["conventional"]["images_per_s"]["median"],
                    "peak_gpu_mib": r.get("peak_gpu_mib"),
                }
            )
    plain = {(r["encoder"], r["loss"]): r for r in rows if not r["compile"]}
    for r in rows:
        base = plain.get((r["encoder"], r["loss"]))
        if r["compile"] and base:
            r["compile_speedup"] = r["images_per_s"] / base["images_per_s"]
    return rows


def reproduction(runs: Path) -> dict[str, Any]:
    train, again = runs / "train", runs / "reproduce"
    if not (train / "results.json").is_file() or not (again / "results.json").is_file():
        return {"compared": False}
    diffs = differences(compared_values(train), compared_values(again))
    results = json.loads((train / "results.json").read_text())
    return {
        "compared": True,
        "bit_identical": not diffs,
        "values_compared": len(compared_values(train)),
        "values_differing": len(diffs),
        "largest_difference": max((d[3] for d in diffs), default=0.0),
        "train_status": results.get("status"),
        "train_device": results.get("device"),
        "metrics": results.get("metrics"),
        "train_time_s": results.get("train_time_s"),
    }


def markdown(summary: dict[str, Any]) -> str:
    lines = [f"# GPU check on {summary['device_asked']}", "", "| step | exit | seconds |"]
    lines += ["|---|---|---|"] + [
        f"| {s['step']} | {s['exit']} | {s['seconds']} |" for s in summary["steps"]
    ]
    lines += [
        "",
        "| encoder | compile | loss | device | batch | img/s | pure img/s | epoch / pure "
        "| conventional img/s | peak GPU MiB | compile speed-up |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in summary["throughput"]:
        peak = f"{r['peak_gpu_mib']:,.0f}" if r["peak_gpu_mib"] is not None else "-"
        speedup = f"{r['compile_speedup']:.2f}x" if "compile_speedup" in r else "-"
        lines.append(
            f"| {r['encoder']} | {'on' if r['compile'] else 'off'} | {r['loss']} | {r['device']} "
            f"| {r['batch_size']} | {r['images_per_s']:,.0f} | {r['pure_images_per_s']:,.0f} "
            f"| {r['epoch_over_pure']:.3f} | {r['conventional_images_per_s']:,.0f} | {peak} "
            f"| {speedup} |"
        )
    rep = summary["reproduction"]
    lines.append("")
    if rep["compared"]:
        verdict = (
            "bit-identical"
            if rep["bit_identical"]
            else f"{rep['values_differing']} values differ, largest {rep['largest_difference']:.3g}"
        )
        lines.append(
            f"Real run ({rep['train_device']}): {rep['train_status']}, metrics "
            f"{json.dumps(rep['metrics'])}; deterministic rerun: {verdict} "
            f"({rep['values_compared']} values compared)."
        )
    else:
        lines.append("Real run or its reproduction missing: see check.log.")
    return "\n".join(lines) + "\n"


def main(argv: list[str]) -> int:
    work, steps_file, out, device = Path(argv[0]), Path(argv[1]), Path(argv[2]), argv[3]
    summary = {
        "device_asked": device,
        "steps": steps(steps_file),
        "throughput": throughput(work / "bench"),
        "reproduction": reproduction(work / "runs"),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(markdown(summary))
    print(markdown(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""A newcomer's first minutes, measured: what the README's "Measured" lines quote.

    python -m benchmarks.first_hour                 # 3 repeats of each, ~10 min on 2 busy cores
    python -m benchmarks.first_hour --repeats 5 --out first_hour.json
    python -m benchmarks.first_hour --no-run        # only the quick ones (no full default run)
    python -m benchmarks.first_hour --repo ../other-checkout   # the same, of another checkout

Each case is the real CLI in a fresh process (``python -m contrastive_cli``) in a temporary
folder, as a user starts it:

- ``help``: ``contrast train --help``, seconds until it exits;
- ``typo``: ``contrast train trainer.epoch=2``, seconds to its first line (the error) and exit;
- ``first line``: ``contrast train`` (the default run: ntxent on digits), seconds to its first
  line of output, then stopped (SIGTERM);
- ``default run``: ``contrast train`` to the end: wall seconds, bytes the process handed to
  write() (``wchar`` of /proc/self/io: files, logs and the terminal), bytes it caused to be
  written to storage (``write_bytes``; 0 on tmpfs), and the size of the run directory after.
  Each repeat starts with an empty baseline cache (``$CONTRAST_CACHE``), as a first run does.

The machine's load average is recorded before and after: on a shared machine the numbers
are indicative only. Only the standard library is used here; the measured processes import
torch themselves.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
# Runs the CLI as `python -m contrastive_cli` does, and reports /proc/self/io when it exits.
WRAPPER = """
import atexit, runpy, sys
def report():
    fields = dict(line.split(": ") for line in open("/proc/self/io").read().splitlines())
    sys.stderr.write(f"\\n@io wchar={fields['wchar']} write_bytes={fields['write_bytes']}\\n")
atexit.register(report)
sys.argv = ["contrast", *sys.argv[1:]]
runpy.run_module("contrastive_cli", run_name="__main__")
"""


def _env(cache: Path, repo: Path) -> dict[str, str]:
    env = {
        **os.environ,
        "PYTHONPATH": str(repo),
        "PYTHONUNBUFFERED": "1",
        "CONTRAST_CACHE": str(cache),
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def first_line(args: list[str], cwd: Path, stop: bool, repo: Path = REPO) -> dict[str, Any]:
    """Seconds to the first non-empty line of output (stdout and stderr together) and, unless
    ``stop``, to the exit; the line and the exit code."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "contrastive_cli", *args],
        cwd=cwd,
        env=_env(cwd / "cache", repo),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    line, first_s = "", None
    for raw in proc.stdout:
        if raw.strip():
            line, first_s = raw.strip(), time.perf_counter() - start
            break
    if stop:
        proc.send_signal(signal.SIGTERM)
    proc.stdout.read()
    code = proc.wait()
    return {
        "first_line_s": first_s,
        "exit_s": time.perf_counter() - start,
        "line": line,
        "code": code,
    }


def default_run(cwd: Path, repo: Path = REPO) -> dict[str, Any]:
    """The default run to the end, with the bytes it wrote."""
    run_dir = cwd / "run"
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", WRAPPER, "train", f"hydra.run.dir={run_dir}"],
        cwd=cwd,
        env=_env(cwd / "cache", repo),
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - start
    io = next(ln for ln in proc.stderr.splitlines() if ln.startswith("@io "))
    counts = {k: int(v) for k, v in (f.split("=") for f in io.split()[1:])}
    size = sum(p.stat().st_size for p in run_dir.rglob("*") if p.is_file())
    return {"wall_s": wall, "code": proc.returncode, **counts, "run_dir_bytes": size}


def _median(runs: list[dict[str, Any]], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.first_hour", description=__doc__.split("\n")[0]
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-run", action="store_true", help="skip the full default run")
    p.add_argument("--out", type=Path, default=None, help="write every run here as JSON")
    p.add_argument("--repo", type=Path, default=REPO, help="the checkout to measure")
    ns = p.parse_args(argv)
    repo = ns.repo.resolve()
    cases: dict[str, list[dict[str, Any]]] = {
        "help": [],
        "typo": [],
        "first line": [],
        "default run": [],
    }
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "load_average_before": os.getloadavg(),
        "repeats": ns.repeats,
        "repo": str(repo),
        "cases": cases,
    }

    def measured(name: str, run: dict[str, Any]) -> None:
        """Keep and show one measurement; the JSON is rewritten after each (a stopped
        benchmark keeps what it measured)."""
        cases[name].append({**run, "load_average_1m": os.getloadavg()[0]})
        print(f"{name}: {json.dumps(cases[name][-1])}", flush=True)
        if ns.out:
            result["load_average_after"] = os.getloadavg()
            ns.out.write_text(json.dumps(result, indent=1) + "\n")

    for _ in range(ns.repeats):  # interleaved: a change in load hits every case alike
        for name, args, stop in (
            ("help", ["train", "--help"], False),
            ("typo", ["train", "trainer.epoch=2"], False),
            ("first line", ["train"], True),
        ):
            with tempfile.TemporaryDirectory() as tmp:
                measured(name, first_line(args, Path(tmp), stop, repo))
    for _ in range(0 if ns.no_run else ns.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            measured("default run", default_run(Path(tmp), repo))
    print(
        f"load average 1 min: before {result['load_average_before'][0]:.2f}, after "
        f"{os.getloadavg()[0]:.2f}"
    )
    for name, key in (
        ("help", "exit_s"),
        ("typo", "first_line_s"),
        ("first line", "first_line_s"),
        ("default run", "wall_s"),
    ):
        if cases[name]:
            runs = ", ".join(f"{r[key]:.1f}" for r in cases[name])
            print(f"{name:12s} {key}: median {_median(cases[name], key):.1f} s ({runs})")
    if cases["default run"]:
        for key in ("wchar", "write_bytes", "run_dir_bytes"):
            print(f"default run  {key}: median {_median(cases['default run'], key) / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

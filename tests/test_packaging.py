"""The package works installed from a wheel, away from any checkout: the configs ship inside."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.conftest import REPO, TINY


def test_wheel_install_runs_without_the_checkout(tmp_path):
    wheels, site = tmp_path / "wheels", tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(wheels),
            str(REPO),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    [wheel] = wheels.glob("*.whl")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--target",
            str(site),
            str(wheel),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    assert (site / "contrastive_cli" / "conf" / "data" / "fashion_mnist.yaml").is_file()
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}

    def contrast(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "contrastive_cli", *args],
            cwd=work,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )

    where = subprocess.run(
        [sys.executable, "-c", "import contrastive_cli; print(contrastive_cli.__file__)"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert where.startswith(str(site))
    assert "fashion_mnist" in contrast("--help").stdout
    tiny = [o for o in TINY if not o.startswith("trainer.epochs")]
    run = contrast(
        "train", *tiny, "trainer.epochs=1", "eval.plots=false", f"hydra.run.dir={work / 'run'}"
    )
    assert run.returncode == 0, run.stderr
    assert json.loads((work / "run" / "results.json").read_text())["status"] == "completed"

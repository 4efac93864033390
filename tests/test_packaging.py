"""The package works installed from a wheel, away from any checkout: the configs ship inside."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

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
    assert wheel.name.startswith("contrastive_cli-")  # the distribution is ours on PyPI
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


def test_the_distribution_name_is_ours_everywhere():
    """``contrast`` on PyPI is an unrelated project: pyproject, every install hint in the
    package and every ``pip install`` line of the README name ``contrastive-cli``; the
    command stays ``contrast``."""
    import contrastive_cli

    tomllib = pytest.importorskip(
        "tomllib", reason="reads pyproject.toml with Python 3.11's tomllib"
    )
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["name"] == contrastive_cli.DISTRIBUTION == "contrastive-cli"
    assert project["scripts"] == {"contrast": "contrastive_cli.cli:main"}
    assert contrastive_cli.install_hint("tracking") == "pip install 'contrastive-cli[tracking]'"
    texts = [p.read_text() for p in (REPO / "contrastive_cli").rglob("*.py")]
    texts.append((REPO / "README.md").read_text())
    for text in texts:
        assert not re.search(r"pip install '?contrast(\[|'|\s|$)", text)
    readme = (REPO / "README.md").read_text()
    for extra in project["optional-dependencies"]:
        if extra != "dev":
            assert f"pip install '{contrastive_cli.DISTRIBUTION}[{extra}]'" in readme, extra

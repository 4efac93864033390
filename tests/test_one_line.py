"""Inputs that used to end in a traceback: each is one line naming the setting, exit 2, and
nothing is created on disk (environment variables of torchrun/SLURM, time budgets,
interpolated targets); a lock left by a killed command is taken over with a message."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from contrastive_cli import writer
from contrastive_cli.distributed import place_from_env
from contrastive_cli.errors import ConfigError
from tests.conftest import REPO, run_cli


@pytest.mark.parametrize(
    "env,name",
    [
        ({"WORLD_SIZE": "2", "RANK": "one"}, "RANK"),
        ({"WORLD_SIZE": "two", "RANK": "0"}, "WORLD_SIZE"),
        ({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "-1"}, "LOCAL_RANK"),
        ({"WORLD_SIZE": "2", "RANK": "5"}, "RANK"),
        ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_PORT": "http"}, "MASTER_PORT"),
        ({"WORLD_SIZE": "2", "RANK": "0", "MASTER_PORT": "70000"}, "MASTER_PORT"),
        ({"SLURM_NTASKS": "x", "SLURM_PROCID": "0"}, "SLURM_NTASKS"),
        ({"SLURM_NTASKS": "2", "SLURM_PROCID": "0", "SLURM_JOB_ID": "1e9"}, "SLURM_JOB_ID"),
    ],
)
def test_bad_process_environment_is_one_line(env, name):
    with pytest.raises(ConfigError, match=rf"^{name}=.* \(environment\) is not allowed; allowed"):
        place_from_env(env)


def test_bad_process_environment_through_the_cli(tmp_path):
    env = {"WORLD_SIZE": "2", "RANK": "zero"}
    done = run_cli(["train", f"hydra.run.dir={tmp_path / 'run'}"], cwd=tmp_path, env=env)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines() == [
        "error: RANK='zero' (environment) is not allowed; allowed: an integer from 0 to 1"
    ]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("value", ["1e308", "400d", "9000h", "0", "-5"])
def test_time_budgets_beyond_a_year_or_not_positive_are_one_line(tmp_path, value):
    from contrastive_cli.command_line import check_command_line

    with pytest.raises(ConfigError, match=r"trainer.time_budget=.*up to a year"):
        check_command_line([f"trainer.time_budget={value}"])


def test_a_huge_budget_fixes_a_finite_number_of_epochs():
    from contrastive_cli.callbacks.budget import MAX_BUDGET_EPOCHS
    from contrastive_cli.callbacks.budget import fit_to_budget as _fit_to_budget
    from contrastive_cli.distributed import SINGLE

    assert _fit_to_budget(400, 0.5, 0.1, SINGLE) == 1 + int(399.5 / 0.1)
    assert _fit_to_budget(366 * 24 * 3600, 0.5, 0.0, SINGLE) == MAX_BUDGET_EPOCHS
    assert _fit_to_budget(400, 500.0, 0.1, SINGLE) == 1


@pytest.mark.parametrize(
    "target", ["${oc.env:CONTRAST_TEST_SECRET}", "${loss._target_}", "${oc.env:NOT_SET_AT_ALL}"]
)
def test_an_interpolated_target_is_one_line_that_shows_no_secret(target, monkeypatch):
    from contrastive_cli.command_line import check_command_line

    monkeypatch.setenv("CONTRAST_TEST_SECRET", "hunter2")
    with pytest.raises(ConfigError, match="never interpolated") as e:
        check_command_line([f"encoder._target_={target}"])
    assert "hunter2" not in str(e.value)


def test_a_lock_left_by_a_killed_command_is_taken_over_and_removed(tmp_path, caplog):
    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import pathlib, time, contrastive_cli.writer as w;"
            f"cm = w.lock(pathlib.Path({str(run)!r}), 'train'); cm.__enter__();"
            "print('locked', flush=True); time.sleep(60)",
        ],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    holder.kill()  # kill -9: the kernel drops the lock, the file stays
    holder.wait()
    assert (run / ".lock").read_text().startswith(f"{holder.pid} train")
    with caplog.at_level(logging.INFO), writer.lock(run, "resume"):
        assert (run / ".lock").read_text() == f"{os.getpid()} resume\n"
    assert f"pid {holder.pid}" in caplog.text and "taking over" in caplog.text
    assert not (run / ".lock").exists()
    with caplog.at_level(logging.INFO), writer.lock(run, "resume"):  # a clean start: no message
        pass
    assert caplog.text.count("taking over") == 1

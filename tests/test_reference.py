"""``contrast train --help``: a settings reference generated from the schemas and configs
(type, allowed values, default, description), without torch, one section with --help KEY."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import typing

import pytest
from omegaconf import open_dict

from contrastive_cli import cli
from contrastive_cli.command_line import compose_with_hydra
from contrastive_cli.config import config_groups
from contrastive_cli.reference import describe, reference, settings
from contrastive_cli.schema import Fraction, PositiveInt, Trainer
from tests.conftest import REPO


def _settings(*overrides: str):
    full = compose_with_hydra(list(overrides))
    choices = {str(k): str(v) for k, v in full.hydra.runtime.choices.items() if v is not None}
    cfg = full.copy()
    with open_dict(cfg):
        cfg.pop("hydra")
    return settings(cfg, choices)


def test_help_is_a_reference_built_without_torch(tmp_path):
    code = (
        "import sys; from contrastive_cli.cli import main; rc = main(sys.argv[1:]); "
        "print('torch imported' if 'torch' in sys.modules else 'torch not imported'); "
        "sys.exit(rc)"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, "train", "--help"],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "torch not imported" in text
    rows = {line.split()[0]: line for line in text.splitlines() if line.startswith("  ")}
    epochs = rows["trainer.epochs"]
    assert "int >= 1" in epochs and "100 (= data.epochs)" in epochs and "budget" in epochs
    assert "one of none|linear|sqrt" in rows["optim.lr_scaling"]
    assert "number > 0" in rows["loss.temperature"] and "0.5" in rows["loss.temperature"]
    assert "data (or $CONTRAST_DATA)" in rows["data.root"]
    for hidden in ("${", "_target_", "_partial_", "data.source.root"):
        assert hidden not in text, hidden
    assert not re.search(r"(?<![a-z])_base\b", text)  # device/_base: internal
    assert not (tmp_path / "outputs").exists()


def test_help_for_one_section_follows_the_chosen_option(capsys):
    assert cli.main(["train", "loss=moco", "--help", "loss"]) == 0
    text = capsys.readouterr().out
    assert "loss=moco (options:" in text and "loss.queue_size" in text
    assert "trainer.epochs" not in text and "encoder." not in text
    assert cli.main(["train", "--help", "trainer.seed"]) == 0
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("  ")]
    assert [ln.split()[0] for ln in lines] == ["trainer.seed"]


def test_help_for_an_unknown_key_is_one_line_with_the_nearest():
    proc_rc = cli.main(["train", "--help", "trainer.epoch"])
    assert proc_rc == 2


def test_help_for_an_unknown_key_says_which(capsys):
    cli.main(["train", "--help", "lose"])
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("error: --help lose") and "did you mean" in line


@pytest.mark.parametrize(
    "group,option", [(g, o) for g, opts in config_groups().items() for o in opts]
)
def test_every_shipped_setting_has_a_type_and_a_description(group, option):
    overrides = [f"{group}={option}"]
    rows = [r for r in _settings(*overrides) if r.key.startswith(group.replace("/", "."))]
    assert rows
    for r in rows:
        assert r.kind and r.about, r


def test_types_in_words():
    assert describe(PositiveInt) == "int >= 1"
    assert describe(Fraction) == "number in (0, 1)"
    budget = typing.get_type_hints(Trainer, include_extras=True)["time_budget"]
    assert describe(budget) == "duration: 15m|90s|1.5h or seconds (> 0, <= 1 year) or null"


def test_reference_lists_the_recipes():
    assert "+experiment=<option>" in reference()

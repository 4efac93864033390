"""A run directory is data: its config is rebuilt from contrast's own conf/ and the run's
recorded overrides, never composed or resolved from its files (``contrastive_cli.rebuild``).

The run directories here are written by the test as ``contrast train`` records them (the
composed config saved resolved, the overrides, Hydra's choices), without training, then
made hostile the ways the issue found: payloads under a ``hydra`` node referenced from
``_args_`` or a loose argument, resolver names built by interpolation, YAML tags, recorded
choices that disagree with the config. Each must be one line, exit 2, before anything is
imported, created or written.
"""

from __future__ import annotations

import importlib
import json
import os
import tempfile
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from contrastive_cli import cli
from contrastive_cli.command_line import compose_with_hydra
from contrastive_cli.errors import ConfigError
from contrastive_cli.rundirs import load_run

MADE = Path(tempfile.gettempdir()) / f"contrast-made-by-a-run-{os.getpid()}"  # must never appear
OVERRIDES = ["loss=moco", "trainer.epochs=3", "eval.baselines=false"]


def record(run: Path, overrides: list[str] = OVERRIDES) -> Path:
    """A run directory's record as ``contrast train`` writes it (no training)."""
    cfg = compose_with_hydra(overrides)
    hydra = OmegaConf.to_container(cfg.hydra, resolve=False)
    job = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save(job, run / ".hydra" / "config.yaml", resolve=True)
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(list(overrides)))
    (run / ".hydra" / "hydra.yaml").write_text(
        yaml.safe_dump({"hydra": {"runtime": {"choices": hydra["runtime"]["choices"]}}})
    )
    return run


def edit(run: Path, name: str, change) -> None:
    path = run / ".hydra" / name
    data = yaml.safe_load(path.read_text())
    data = change(data) or data
    path.write_text(yaml.safe_dump(data))


@pytest.fixture
def run(tmp_path) -> Path:
    return record(tmp_path / "run")


@pytest.fixture
def spy(monkeypatch, tmp_path):
    """Every module imported and every Hydra ``_locate`` while a command runs."""
    import hydra._internal.utils as hydra_utils

    seen: list[str] = []
    real_import, real_locate = importlib.import_module, hydra_utils._locate

    def imported(name, package=None):
        seen.append(name)
        return real_import(name, package)

    def located(path):
        seen.append(path)
        return real_locate(path)

    monkeypatch.setattr(importlib, "import_module", imported)
    monkeypatch.setattr(hydra_utils, "_locate", located)
    return seen


def one_line(capsys, code: int) -> str:
    out = capsys.readouterr()
    lines = [ln for ln in out.err.splitlines() if ln.strip()]
    assert code == 2, (code, out.err, out.out)
    assert len(lines) == 1 and lines[0].startswith("error: "), out.err
    assert "Traceback" not in out.err + out.out
    return lines[0]


def test_a_recorded_run_rebuilds_to_its_own_config_and_choices(run):
    loaded = load_run(run)
    assert loaded.problem is None
    assert loaded.choices["loss"] == "moco" and loaded.choices["encoder"] == "cnn"
    cfg = loaded.config()
    assert cfg.loss._target_ == OmegaConf.load(run / ".hydra" / "config.yaml").loss._target_
    assert cfg.trainer.epochs == 3
    assert OmegaConf.is_interpolation(cfg.loss, "out_dim")  # conf/'s interpolation, not the file's


def test_choices_come_from_the_config_not_from_hydra_yaml(run):
    """hydra.yaml said supcon/resnet18 for an ntxent/cnn run: refused, never trusted."""
    edit(run, "hydra.yaml", lambda d: d["hydra"]["runtime"]["choices"].update(loss="supcon"))
    loaded = load_run(run)
    assert "loss='supcon'" in loaded.problem and "loss=moco" in loaded.problem
    with pytest.raises(ConfigError, match=r"hydra\.yaml"):
        loaded.config()
    (run / ".hydra" / "hydra.yaml").unlink()  # no record of choices: derived all the same
    assert load_run(run).choices["loss"] == "moco"


# The payloads. `hydra.x` names a payload node the old check skipped.
PAYLOAD = {"_target_": "builtins.exec", "_args_": ["open('MARKER', 'w')"]}
HOSTILE_CONFIGS = {
    "hydra node + device._args_": lambda c: c.update(
        hydra={"x": PAYLOAD}, device={**c["device"], "_args_": ["${hydra.x}"]}
    ),
    "data.augment._args_": lambda c: c["data"]["augment"].update(_args_=["${hydra.x}"]),
    "loose argument": lambda c: c["loss"].update(gather="${hydra.x}"),
    "resolver name built by interpolation": lambda c: c["data"].update(
        root="${oc.${hydra.n}:{_target_: builtins.exec}}"
    ),
    "oc.decode": lambda c: c["data"].update(root="${oc.decode:'{_target_: builtins.exec}'}"),
    "unique_dir": lambda c: c["data"].update(root="${unique_dir:" + str(MADE) + "}"),
    "a _target_ where a value belongs": lambda c: c["device"].update(type=PAYLOAD),
    "_partial_ in a new place": lambda c: c["trainer"].update(_partial_=True),
    "a shipped target in another slot": lambda c: c["encoder"].update(
        _target_="contrastive_cli.tracking.mlflow_tracker.MlflowTracker"
    ),
    "a changed value": lambda c: c["loss"].update(temperature=0.3),
    "a key conf/ does not have": lambda c: c["trainer"].update(extra=1),
}


@pytest.mark.parametrize("case", list(HOSTILE_CONFIGS))
@pytest.mark.parametrize("command", ["eval", "embed", "reproduce", "resume", "plot"])
def test_a_hostile_saved_config_is_refused_before_anything_runs(
    run, tmp_path, capsys, spy, monkeypatch, case, command
):
    monkeypatch.chdir(tmp_path)
    edit(run, "config.yaml", HOSTILE_CONFIGS[case])
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    argv = {
        "eval": ["eval", str(run)],
        "embed": ["embed", str(run), "--out", str(tmp_path / "e.npy")],
        "reproduce": ["reproduce", str(run), "--out", str(tmp_path / "again")],
        "resume": ["resume", str(run)],
        "plot": ["plot", str(run), "--out", str(tmp_path / "plots")],
    }[command]
    code = cli.main(argv)
    if command == "plot":  # plot lists what it can: the run is unreadable, nothing drawn
        out = capsys.readouterr()
        assert "Traceback" not in out.err + out.out
        assert not (tmp_path / "plots" / "embedding.png").exists()
    else:
        line = one_line(capsys, code)
        assert "config.yaml" in line and "not allowed" in line, line
    assert not any("builtins" in s for s in spy), spy
    assert not (tmp_path / "MARKER").exists() and not MADE.exists()
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before
    assert {p.name for p in tmp_path.iterdir()} <= {"run", "plots"}


HOSTILE_OVERRIDES = {
    "interpolation": "loss.temperature=${oc.env:HOME}",
    "resolver": "data.root=${unique_dir:" + str(MADE) + "}",
    "target": "encoder._target_=builtins.exec",
    "args": "+encoder._args_=[1]",
    "mapping with a target": "device.type={_target_:builtins.exec}",
    "unknown option": "loss=../../../tmp/evil",
    "hydra's own setting": "hydra.run.dir=/tmp/elsewhere",
    "sweep": "loss=moco,ntxent",
    "package": "loss@encoder=moco",
    "not a string": 5,
}


@pytest.mark.parametrize("case", list(HOSTILE_OVERRIDES))
def test_a_hostile_recorded_override_is_refused_in_one_line(run, tmp_path, capsys, spy, case):
    edit(run, "overrides.yaml", lambda d: [*d, HOSTILE_OVERRIDES[case]])
    line = one_line(capsys, cli.main(["eval", str(run)]))
    assert "overrides.yaml" in line and "not" in line, line
    assert not any("builtins" in s for s in spy)
    assert not MADE.exists()


@pytest.mark.parametrize(
    "name,text",
    [
        ("config.yaml", "trainer: !!python/object/apply:os.system ['touch MARKER']\n"),
        ("config.yaml", "trainer: !custom {epochs: 1}\n"),
        ("overrides.yaml", "- !override loss=moco\n"),
        ("hydra.yaml", "hydra: {runtime: {choices: !!set {a: null}}}\n"),
    ],
)
def test_yaml_tags_in_run_files_are_refused(run, tmp_path, capsys, name, text):
    (run / ".hydra" / name).write_text(text)
    line = one_line(capsys, cli.main(["eval", str(run)]))
    assert "YAML tag" in line and name in line


def test_hydra_yaml_choices_are_data(run, capsys):
    edit(
        run,
        "hydra.yaml",
        lambda d: d["hydra"]["runtime"].update(choices="${unique_dir:" + str(MADE) + "}"),
    )
    one_line(capsys, cli.main(["eval", str(run)]))
    edit(run, "hydra.yaml", lambda d: d["hydra"]["runtime"].update(choices={"loss": "${oc.env:X}"}))
    line = one_line(capsys, cli.main(["eval", str(run)]))
    assert "hydra.yaml" in line and "${" in line


def test_a_user_allowed_target_rebuilds_only_with_the_variable(tmp_path, monkeypatch, capsys):
    """CONTRAST_EXTRA_TARGETS: a colleague's own encoder needs the same variable here."""
    monkeypatch.setenv("CONTRAST_EXTRA_TARGETS", "encoder=torch.nn.Identity")
    run = record(tmp_path / "run", ["encoder._target_=torch.nn.Identity"])
    assert load_run(run).config().encoder._target_ == "torch.nn.Identity"
    monkeypatch.delenv("CONTRAST_EXTRA_TARGETS")
    line = one_line(capsys, cli.main(["eval", str(run)]))
    assert "CONTRAST_EXTRA_TARGETS" in line


def test_a_time_budget_run_rebuilds_with_the_epochs_it_fixed(tmp_path, capsys):
    run = record(tmp_path / "run", ["trainer.time_budget=15m"])
    edit(run, "config.yaml", lambda c: c["trainer"].update(epochs=7, time_budget=None))
    cfg = load_run(run).config()
    assert cfg.trainer.epochs == 7 and cfg.trainer.time_budget is None
    edit(run, "config.yaml", lambda c: c["trainer"].update(epochs="7; rm -rf"))
    one_line(capsys, cli.main(["eval", str(run)]))


def test_runs_labels_runs_by_their_rebuilt_choices(tmp_path, capsys):
    """An ntxent/cnn run whose hydra.yaml is missing (or says supcon) is never shown as supcon."""
    ok = record(tmp_path / "tree" / "ok", ["loss=triplet"])
    (ok / ".hydra" / "hydra.yaml").unlink()
    bad = record(tmp_path / "tree" / "bad", [])
    edit(bad, "hydra.yaml", lambda d: d["hydra"]["runtime"]["choices"].update(loss="supcon"))
    assert cli.main(["runs", str(tmp_path / "tree"), "--json", "-"]) == 0
    rows = {Path(r["path"]).name: r for r in json.loads(capsys.readouterr().out)}
    assert rows["ok"]["loss"] == "triplet"
    assert rows["bad"]["loss"] != "supcon" and rows["bad"]["status"] == "unreadable"


METADATA = {
    "interpolation": {"widths": "${oc.create:{_target_: builtins.exec}}"},
    "args": {"_args_": ["x"]},
    "nested target": {"widths": [{"_target_": "builtins.exec"}]},
    "foreign target": {"_target_": "builtins.exec"},
    "unknown key": {"depth": 3},
}


@pytest.mark.parametrize("case", list(METADATA))
def test_weights_metadata_is_rebuilt_as_data(tmp_path, capsys, spy, case):
    import torch
    from safetensors.torch import save_file

    encoder = {"_target_": "contrastive_cli.models.encoders.ConvNet", **METADATA[case]}
    path = tmp_path / "encoder.safetensors"
    meta = {
        "format": "contrast-encoder-v1",
        "encoder": json.dumps(encoder),
        "data": "digits",
        "channels": "1",
        "image_size": "8",
        "seed": "0",
    }
    save_file({"x": torch.zeros(1)}, str(path), metadata=meta)
    line = one_line(capsys, cli.main(["eval", str(path)]))
    # refused here, or by the header's own depth limit first (contrastive_cli.untrusted)
    assert ("metadata" in line and "not allowed" in line) or "nests" in line, line
    assert not any("builtins" in s for s in spy)


def test_weights_metadata_rebuilds_the_shipped_encoder():
    from contrastive_cli.rebuild import metadata_encoder

    node = metadata_encoder(
        {"_target_": "contrastive_cli.models.encoders.ConvNet", "widths": [8, 16]}, "f"
    )
    assert list(node.widths) == [8, 16] and list(node.strides) == [2, 2, 2, 2]


def test_a_run_made_with_another_data_root_rebuilds_with_yours(tmp_path, monkeypatch):
    """data.root comes from CONTRAST_DATA on the machine that made the run; the keys that
    refer to it (data.source.root) agree with the saved config, and the reader's root is used."""
    monkeypatch.setenv("CONTRAST_DATA", "/theirs/data")
    run = record(tmp_path / "run", ["data=mnist"])
    saved = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
    assert saved["data"]["source"]["root"] == "/theirs/data"
    monkeypatch.setenv("CONTRAST_DATA", str(tmp_path / "mine"))
    cfg = load_run(run).config()
    assert cfg.data.source.root == str(tmp_path / "mine")

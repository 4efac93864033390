"""A run directory or encoder file from someone else is data, never code; odd run
directories, files and concurrent commands give one line, never a traceback or damage.

Each case builds the malicious or malformed file here, runs the real command (in-process
through ``cli.main``, or as a subprocess where the process itself matters) and checks the
exit code, the one line, and that no marker file appeared and no byte of the user's files
changed.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from contrastive_cli import cli
from contrastive_cli.checkpoint import load_checkpoint, save_checkpoint
from tests.conftest import REPO, TINY, one_error_line, read_results, run_cli, snapshot

CFG = [o for o in TINY if not o.startswith("trainer.epochs")] + [
    "trainer.epochs=2",
    "eval.baselines=false",
    "eval.plots=false",
]
PAYLOAD = """
import pathlib
MARKER = pathlib.Path(__file__).with_name("MARKER")


def boom(*args, **kwargs):
    MARKER.write_text("code ran")
    return 0


class Boom:
    def __init__(self, *args, **kwargs):
        MARKER.write_text("code ran")
"""


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A completed tiny run (2 epochs on digits): copied, then damaged, by each test."""
    root = tmp_path_factory.mktemp("finished")
    run_cli(["train", *CFG, f"hydra.run.dir={root / 'run'}"], cwd=root, check=True)
    return root / "run"


@pytest.fixture
def payload(tmp_path, monkeypatch) -> Path:
    """An importable module whose callables leave a MARKER file when called."""
    folder = tmp_path / "payload"
    folder.mkdir()
    (folder / "evil_payload.py").write_text(PAYLOAD)
    monkeypatch.syspath_prepend(str(folder))
    return folder / "MARKER"


def _copy(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest, symlinks=True)
    return dest


def _edit_config(run: Path, edit) -> None:
    """Apply ``edit(dict)`` to the saved config (compared with the rebuilt one, never used)."""
    path = run / ".hydra" / "config.yaml"
    cfg = yaml.safe_load(path.read_text())
    edit(cfg)
    path.write_text(yaml.safe_dump(cfg))


def _override(run: Path, key: str, value) -> None:
    """Change a setting the way its owner would have: a recorded override and the saved config
    that agrees with it."""
    path = run / ".hydra" / "overrides.yaml"
    path.write_text(yaml.safe_dump([*yaml.safe_load(path.read_text()), f"{key}={value}"]))
    section, name = key.split(".")
    _edit_config(run, lambda c: c[section].__setitem__(name, value))


def _commands(run: Path, tmp: Path) -> dict[str, list[str]]:
    return {
        "eval": ["eval", str(run)],
        "embed": ["embed", str(run), "--out", str(tmp / "e.npy")],
        "reproduce": ["reproduce", str(run), "--out", str(tmp / "again")],
        "resume": ["resume", str(run)],
    }


# Where a payload is put: inside a plain value (the two examples), in place of a
# shipped target, deep in an object's arguments, and in a new top-level node.
INJECTIONS = {
    "device.type": lambda c, t: c["device"].__setitem__("type", {"_target_": t}),
    "data.augment.mean": lambda c, t: c["data"]["augment"].__setitem__(
        "mean", {"_target_": t, "_args_": ["x"]}
    ),
    "encoder._target_": lambda c, t: c["encoder"].__setitem__("_target_", t),
    "loss.projector._target_": lambda c, t: c["loss"]["projector"].__setitem__("_target_", t),
    "encoder._args_": lambda c, t: c["encoder"].__setitem__("_args_", [{"_target_": t}]),
    "new top-level node": lambda c, t: c.__setitem__("extra", {"_target_": t}),
}


@pytest.mark.parametrize("command", ["eval", "embed", "reproduce", "resume"])
@pytest.mark.parametrize("where", list(INJECTIONS))
def test_a_target_in_a_run_directory_never_runs(
    finished, tmp_path, payload, capsys, command, where
):
    run = _copy(finished, tmp_path / "run")
    _edit_config(run, lambda c: INJECTIONS[where](c, "evil_payload.boom"))
    if command == "resume":
        (run / "results.json").unlink()
    before = snapshot(run)
    line = one_error_line(capsys, cli.main(_commands(run, tmp_path)[command]))
    assert ("_target_" in line or "_args_" in line) and "not allowed" in line, line
    assert not payload.exists(), "the payload ran"
    assert snapshot(run) == before
    assert not (tmp_path / "again").exists() and not (tmp_path / "e.npy").exists()


def test_installed_callables_that_evaluate_text_are_refused_too(finished, tmp_path, capsys):
    """Hydra blocks os.system; builtins.exec and friends are stopped by the allowlist."""
    marker = tmp_path / "MARKER"
    run = _copy(finished, tmp_path / "run")
    code = f"open({str(marker)!r}, 'w').write('ran')"
    _edit_config(
        run,
        lambda c: c["device"].__setitem__("type", {"_target_": "builtins.exec", "_args_": [code]}),
    )
    one_error_line(capsys, cli.main(["eval", str(run)]))
    assert not marker.exists()


def test_interpolations_that_call_resolvers_are_refused(finished, tmp_path, capsys):
    run = _copy(finished, tmp_path / "run")
    made = tmp_path / "made-by-resolver"
    _edit_config(run, lambda c: c["data"].__setitem__("root", f"${{unique_dir:{made}}}"))
    line = one_error_line(capsys, cli.main(["eval", str(run)]))
    assert "unique_dir" in line
    assert not made.exists()


def test_yaml_aliases_cannot_blow_up_a_config(finished, tmp_path, capsys):
    """A few hundred bytes of nested aliases would expand into millions of nodes."""
    run = _copy(finished, tmp_path / "run")
    lines = ['a0: &a0 ["x","x","x","x","x","x","x","x","x","x"]']
    lines += [f"a{i}: &a{i} [{','.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    (run / ".hydra" / "config.yaml").write_text("\n".join(lines) + "\n")
    started = time.monotonic()
    line = one_error_line(capsys, cli.main(["reproduce", str(run), "--out", str(tmp_path / "r")]))
    assert "aliases" in line and time.monotonic() - started < 10


def _encoder_file(finished: Path, tmp_path: Path, **metadata: str) -> Path:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(finished / "encoder.safetensors"), "pt") as f:
        meta = {**(f.metadata() or {}), **metadata}
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
    path = tmp_path / "enc.safetensors"
    save_file(tensors, str(path), metadata=meta)
    return path


@pytest.mark.parametrize(
    "metadata",
    [
        {"encoder": json.dumps({"_target_": "evil_payload.boom"})},
        {
            "encoder": json.dumps(
                {
                    "_target_": "contrastive_cli.models.encoders.ConvNet",
                    "widths": {"_target_": "evil_payload.boom"},
                }
            )
        },
        {"encoder": "[1, 2"},
        {"data": "../../etc"},
        {"channels": "-1"},
        {"image_size": "1e9"},
        {"seed": "nan"},
        {"format": "something-else"},
    ],
    ids=lambda m: next(iter(m)) + ":" + next(iter(m.values()))[:30],
)
def test_bare_encoder_metadata_is_parsed_against_a_schema(
    finished, tmp_path, payload, capsys, metadata
):
    path = _encoder_file(finished, tmp_path, **metadata)
    one_error_line(capsys, cli.main(["eval", str(path)]), (1, 2))
    assert not payload.exists()


@pytest.mark.parametrize(
    "damage",
    ["header length", "header json", "tensor sizes", "truncated", "empty"],
)
def test_a_damaged_safetensors_file_isone_error_line(finished, tmp_path, capsys, damage):
    good = (finished / "encoder.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", good[:8])
    header = json.loads(good[8 : 8 + n])
    if damage == "header length":
        data = struct.pack("<Q", 2**62) + good[8:]
    elif damage == "header json":
        data = good[:8] + b"{" * n + good[8 + n :]
    elif damage == "tensor sizes":
        name = next(k for k in header if k != "__metadata__")
        header[name]["data_offsets"][1] += 10**9
        text = json.dumps(header).encode()
        data = struct.pack("<Q", len(text)) + text + good[8 + n :]
    elif damage == "truncated":
        data = good[: len(good) // 2]
    else:
        data = b""
    run = _copy(finished, tmp_path / "run")
    (run / "encoder.safetensors").write_bytes(data)
    bare = tmp_path / "bare.safetensors"
    bare.write_bytes(data)
    one_error_line(capsys, cli.main(["eval", str(run)]), (1, 2))
    one_error_line(capsys, cli.main(["embed", str(run), "--out", str(tmp_path / "e.npy")]), (1, 2))
    one_error_line(capsys, cli.main(["eval", str(bare)]), (1, 2))


def test_an_encoder_of_other_shapes_isone_error_line(finished, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    run = _copy(finished, tmp_path / "run")
    weights = load_file(str(run / "encoder.safetensors"))
    name = next(iter(weights))
    weights[name] = torch.zeros(3, 3)
    save_file(weights, str(run / "encoder.safetensors"))
    line = one_error_line(capsys, cli.main(["eval", str(run)]), 1)
    assert name in line and "(3, 3)" in line


def test_resume_refuses_a_symlinked_train_log(finished, tmp_path, capsys):
    victim = tmp_path / "bashrc"
    victim.write_text("precious\n")
    run = _copy(finished, tmp_path / "run")
    (run / "results.json").unlink()
    (run / "train.log").unlink()
    (run / "train.log").symlink_to(victim)
    line = one_error_line(capsys, cli.main(["resume", str(run)]))
    assert "symbolic link" in line
    assert victim.read_text() == "precious\n"


@pytest.mark.parametrize("name", ["metrics.jsonl", "checkpoints", "results.json"])
def test_no_run_directory_file_is_written_through_a_link(finished, tmp_path, capsys, name):
    outside = tmp_path / "outside"
    run = _copy(finished, tmp_path / "run")
    (run / "results.json").unlink()
    target = run / name
    if target.is_dir():
        shutil.copytree(target, outside)
        shutil.rmtree(target)
    elif target.exists():
        shutil.copy(target, outside)
        target.unlink()
    else:
        outside.write_text("precious\n")
    before = snapshot(outside) if outside.is_dir() else outside.read_bytes()
    target.symlink_to(outside)
    line = one_error_line(capsys, cli.main(["resume", str(run)]))
    assert "symbolic link" in line
    after = snapshot(outside) if outside.is_dir() else outside.read_bytes()
    assert after == before, "a file outside the run directory changed"


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("results.json", "{not json"),
        ("results.json", "[1, 2, 3]"),
        ("results.json", '{"status": "completed", "metrics": {"knn_k200": "high"}}'),
        ("results.json", b"\xff\xfe\x00garbage"),
        (".hydra/config.yaml", "trainer: [unclosed"),
        (".hydra/config.yaml", "- a list\n- not a mapping\n"),
        (".hydra/config.yaml", b"\x00\x01\x02\xff"),
        (".hydra/hydra.yaml", "hydra: {runtime: {choices: 5}}"),
        (".hydra/overrides.yaml", "{a: 1}"),
        ("metrics.jsonl", '{"epoch": 1, "loss": 1.0}\nnot json\n{"epoch": 2}\n'),
    ],
    ids=lambda v: v if isinstance(v, str) and len(v) < 20 else None,
)
def test_malformed_files_are_one_line_and_runs_lists_the_rest(
    finished, tmp_path, capsys, name, content
):
    tree = tmp_path / "outputs"
    good = _copy(finished, tree / "good")
    bad = _copy(finished, tree / "bad")
    path = bad / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    code = cli.main(["runs", str(tree)])
    out = capsys.readouterr()
    assert code == 0 and "Traceback" not in out.err, out.err
    assert str(good) in out.out and str(bad) in out.out
    if name in ("results.json", ".hydra/hydra.yaml", ".hydra/overrides.yaml"):
        assert "unreadable" in out.out
    for args in (
        ["eval", str(bad)],
        ["reproduce", str(bad), "--out", str(tmp_path / "r")],
        ["plot", str(bad), "--out", str(tmp_path / "p")],
    ):
        code = cli.main(args)
        out = capsys.readouterr()
        assert "Traceback" not in out.err + out.out
        if code != 0:
            assert len([ln for ln in out.err.splitlines() if ln.strip()]) == 1, out.err


def test_a_partial_last_metrics_line_is_dropped_on_resume(finished, tmp_path, capsys):
    """kill -9 during a write can leave half a line: resume continues, the file is whole."""
    run = _copy(finished, tmp_path / "run")
    (run / "results.json").unlink()
    full = (run / "metrics.jsonl").read_text()
    (run / "metrics.jsonl").write_text(full + '{"epoch": 3, "lo')
    assert cli.main(["runs", str(run)]) == 0
    assert cli.main(["resume", str(run)]) == 0
    capsys.readouterr()
    assert (run / "metrics.jsonl").read_text() == full
    assert read_results(run)["status"] == "completed"


def test_runs_csv_into_a_folder_or_unwritable_path_isone_error_line(finished, tmp_path, capsys):
    one_error_line(capsys, cli.main(["runs", str(finished), "--csv", str(tmp_path)]), 1)
    one_error_line(
        capsys, cli.main(["runs", str(finished), "--csv", str(tmp_path / "no" / "x.csv")]), 1
    )


def _state_with(finished: Path, edit) -> Path:
    """A checkpoint with a valid checksum whose contents ``edit`` changed."""
    state = load_checkpoint(finished / "checkpoints" / "last.pt")
    state.pop("format")
    edit(state)
    return state


@pytest.mark.parametrize(
    "edit",
    [
        lambda s: s["method"].__setitem__(next(iter(s["method"])), torch.zeros(1)),
        lambda s: s["method"].pop(next(iter(s["method"]))),
        lambda s: s.pop("optimizer"),
        lambda s: s.__setitem__("progress", {"epoch": "two"}),
        lambda s: s["optimizer"].__setitem__("param_groups", []),
    ],
    ids=["shape", "missing weight", "no optimizer", "bad progress", "optimizer groups"],
)
def test_a_checksummed_checkpoint_that_does_not_fit_isone_error_line(
    finished, tmp_path, capsys, edit
):
    run = _copy(finished, tmp_path / "run")
    (run / "results.json").unlink()
    (run / "checkpoints" / "prev.pt").unlink(missing_ok=True)
    save_checkpoint(run / "checkpoints" / "last.pt", _state_with(finished, edit))
    (run / "checkpoints" / "prev.pt").unlink(missing_ok=True)
    one_error_line(capsys, cli.main(["resume", str(run)]), (1, 2))


def test_resume_refuses_a_config_that_no_longer_matches_its_checkpoint(finished, tmp_path, capsys):
    run = _copy(finished, tmp_path / "run")
    (run / "results.json").unlink()
    _override(run, "loss.temperature", 0.1)
    line = one_error_line(capsys, cli.main(["resume", str(run)]))
    assert "loss" in line and "checkpoint" in line


def test_resume_refuses_fewer_epochs_than_the_checkpoint_holds(finished, tmp_path, capsys):
    run = _copy(finished, tmp_path / "run")
    (run / "results.json").unlink()
    _override(run, "trainer.epochs", 1)
    line = one_error_line(capsys, cli.main(["resume", str(run)]))
    assert "trainer.epochs=1" in line and "epoch 2" in line
    assert not (run / "results.json").exists(), "must not be reported as completed"


def test_a_second_command_on_a_busy_run_directory_refuses(tmp_path):
    """Two resumes at once: the second says the directory is in use; nothing is mixed."""
    run = tmp_path / "run"
    cfg = [o for o in CFG if not o.startswith("trainer.epochs")] + ["trainer.epochs=1"]
    run_cli(["train", *cfg, f"hydra.run.dir={run}"], cwd=tmp_path, check=True)
    (run / "results.json").unlink()
    _edit_config(run, lambda c: None)
    # The first resume holds the lock while it runs; keep it busy long enough.
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    first = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time, contrastive_cli.writer as w, pathlib, sys;"
            f"cm = w.lock(pathlib.Path({str(run)!r}), 'resume'); cm.__enter__(); print('locked', flush=True);"
            " time.sleep(60)",
        ],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert first.stdout.readline().strip() == "locked"
        before = snapshot(run)
        second = run_cli(["resume", str(run)], cwd=tmp_path, timeout=120)
        lines = [ln for ln in second.stderr.splitlines() if ln.strip()]
        assert second.returncode == 1 and len(lines) == 1, second.stderr
        assert "in use by another contrast command" in lines[0] and str(first.pid) in lines[0]
        assert snapshot(run) == before
    finally:
        first.kill()
        first.wait()
    # The lock dies with its holder (even after SIGKILL): now the resume goes through.
    run_cli(["resume", str(run)], cwd=tmp_path, check=True, timeout=300)
    assert read_results(run)["status"] == "completed"

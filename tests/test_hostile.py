"""Hostile files inside a run directory or data folder (issue 27): symlinks, FIFOs, devices,
unbounded sizes, deep nesting, huge numbers, terminal escapes and non-UTF-8 names never
hang, leak, exhaust memory or print a traceback; a refused command changes nothing.

Each case builds its hostile file here and runs the real command, bounded in time: an
in-process command is stopped by SIGALRM after ``LIMIT_S`` (a hang fails the test instead
of the suite), a subprocess by its timeout.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import struct
import time
from pathlib import Path

import pytest
import yaml

from contrastive_cli import cli, untrusted
from tests.conftest import TINY, one_error_line, run_cli, snapshot

LIMIT_S = 20
CFG = [o for o in TINY if not o.startswith("trainer.epochs")] + [
    "trainer.epochs=2",
    "eval.baselines=false",
    "eval.plots=false",
]
pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX only")


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A completed tiny run (2 epochs on digits), copied and then damaged by each test."""
    root = tmp_path_factory.mktemp("finished")
    run_cli(["train", *CFG, f"hydra.run.dir={root / 'run'}"], cwd=root, check=True)
    return root / "run"


@pytest.fixture
def bounded():
    """Fail (instead of hanging) when the test body runs longer than LIMIT_S."""

    def alarm(signum, frame):
        raise TimeoutError(f"still running after {LIMIT_S} s: a hostile file hung the command")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(LIMIT_S)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def _copy(run: Path, dest: Path) -> Path:
    shutil.copytree(run, dest, symlinks=True)
    return dest


def _replace(path: Path, kind: str, target: Path | None = None) -> None:
    """Put a FIFO, a folder or a symbolic link where ``path`` was."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif os.path.lexists(path):
        path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dir":
        path.mkdir()
    else:
        path.symlink_to(target)


# --------------------------------------------------------------------------- the reader
def test_the_reader_refuses_fifos_devices_folders_and_links(tmp_path, bounded):
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "dir").mkdir()
    (tmp_path / "link").symlink_to("/dev/zero")
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "f").write_text("x")
    (tmp_path / "via").symlink_to(tmp_path / "real")
    for name, what in [("fifo", "FIFO"), ("dir", "folder"), ("link", "symbolic link")]:
        with pytest.raises(untrusted.UntrustedFile, match=what):
            untrusted.read_bytes(tmp_path / name, "json", root=tmp_path)
    with pytest.raises(untrusted.UntrustedFile, match="symbolic link"):
        untrusted.read_bytes(tmp_path / "via" / "f", "json", root=tmp_path)
    with pytest.raises(untrusted.UntrustedFile, match="character device"):
        untrusted.read_bytes(Path("/dev/zero"), "json", follow=True)
    assert untrusted.read_bytes(tmp_path / "real" / "f", "json", root=tmp_path) == b"x"


def test_the_reader_caps_sizes_depth_and_numbers(tmp_path):
    big = tmp_path / "big.json"
    big.write_bytes(b" " * (untrusted.LIMITS["json"] + 1))
    with pytest.raises(untrusted.UntrustedFile, match="at most"):
        untrusted.read_json(big)
    for text in (
        "[" * 100 + "]" * 100,
        '{"a": 1e308}',
        '{"a": Infinity}',
        '{"a": NaN}',
        "1" * 5000,
    ):
        with pytest.raises(untrusted.UntrustedFile):
            untrusted.parse_json(text, "x")
    assert untrusted.parse_json('{"a": [1, 0.5, "[[[["]}', "x") == {"a": [1, 0.5, "[[[["]}


def test_deeply_nested_yaml_is_refused_in_linear_time():
    """PyYAML's scanner is quadratic in flow depth: 40 kB took minutes before the check."""
    started = time.monotonic()
    for text in ("a: " + "[" * 20000 + "]" * 20000, "a: " + "{b: " * 10000 + "}" * 10000):
        with pytest.raises(untrusted.UntrustedFile, match="nests"):
            untrusted.check_yaml(text, "x")
    block = "a:\n" + "".join(" " * i + "b:\n" for i in range(1, 60))
    with pytest.raises(untrusted.UntrustedFile, match="nests"):
        untrusted.check_yaml(block, "x")
    with pytest.raises(untrusted.UntrustedFile, match="tag"):
        untrusted.check_yaml("a: !!python/object:os.system {}", "x")
    with pytest.raises(untrusted.UntrustedFile, match="finite"):
        untrusted.check_yaml("a: .inf", "x")
    assert time.monotonic() - started < 5


def test_printable_shows_control_characters_as_escapes():
    shown = untrusted.printable("ok\x1b]0;owned\x07\x1b[2J\r\u202eevil caf\udce9")
    assert shown == "ok\\x1b]0;owned\\x07\\x1b[2J\\x0d\\u202eevil caf\\xe9"
    assert untrusted.printable("plain text: ü, 日本") == "plain text: ü, 日本"


# --------------------------------------------------------------------------- FIFOs and links
@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("metrics.jsonl", "fifo"),
        ("train.log", "fifo"),
        (".lock", "fifo"),
        (".lock", "dir"),
        ("metrics.jsonl", "/dev/zero"),
        ("checkpoints/last.pt", "fifo"),
    ],
)
def test_resume_with_a_fifo_folder_or_device_in_the_run_isone_error_line(
    finished, tmp_path, capsys, bounded, name, kind
):
    run = _copy(finished, tmp_path / "run")
    (run / "results.json").unlink()
    (run / "checkpoints" / "prev.pt").unlink(missing_ok=True)
    _replace(run / name, "link" if kind.startswith("/") else kind, Path(kind))
    before = snapshot(run)
    line = one_error_line(capsys, cli.main(["resume", str(run)]), (1, 2))
    assert name.split("/")[-1] in line, line
    assert snapshot(run) == before


@pytest.mark.parametrize("kind", ["fifo", "/dev/zero", "dir"])
def test_plot_and_runs_with_hostile_metrics_or_results(finished, tmp_path, capsys, bounded, kind):
    tree = tmp_path / "tree"
    run = _copy(finished, tree / "run")
    _replace(run / "metrics.jsonl", "link" if kind.startswith("/") else kind, Path(kind))
    one_error_line(
        capsys, cli.main(["plot", str(run), "--no-embedding", "--out", str(tmp_path / "p")])
    )
    _replace(run / "results.json", "link" if kind.startswith("/") else kind, Path(kind))
    assert cli.main(["runs", str(tree)]) == 0
    out = capsys.readouterr().out
    assert "unreadable" in out and "results.json" in out


def test_a_fifo_or_link_as_the_saved_config_isone_error_line(finished, tmp_path, capsys, bounded):
    secret = tmp_path / "secret.yaml"
    secret.write_text(yaml.safe_dump({"token": "s3cret"}))
    for kind in ("fifo", "link"):
        run = _copy(finished, tmp_path / kind)
        (run / ".hydra" / "config_unresolved.yaml").unlink(missing_ok=True)  # older runs had it
        _replace(run / ".hydra" / "config.yaml", kind, secret)
        line = one_error_line(capsys, cli.main(["eval", str(run)]))
        assert "config.yaml" in line and "s3cret" not in line


def test_reproduce_never_copies_or_follows_links_in_hydra(finished, tmp_path, capsys, bounded):
    """A planted .hydra/hydra.yaml -> private key was copied into the new run."""
    key = tmp_path / "id_rsa"
    key.write_text("PRIVATE KEY\n")
    run = _copy(finished, tmp_path / "run")
    _replace(run / ".hydra" / "hydra.yaml", "link", key)  # read (never copied) by reproduce
    out = tmp_path / "again"
    one_error_line(capsys, cli.main(["reproduce", str(run), "--out", str(out)]))
    assert not out.exists(), "a refused reproduce created its run directory"
    # The whole .hydra folder as a link: refused the same way.
    run2 = _copy(finished, tmp_path / "run2")
    elsewhere = tmp_path / "elsewhere"
    shutil.move(run2 / ".hydra", elsewhere)
    (run2 / ".hydra").symlink_to(elsewhere)
    line = one_error_line(capsys, cli.main(["eval", str(run2)]))
    assert "symbolic link" in line


def test_mlflow_artifacts_skip_links(tmp_path):
    from contrastive_cli.tracking.mlflow_tracker import _artifacts

    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text("a: 1\n")
    (tmp_path / ".hydra" / "key").symlink_to("/etc/hostname")
    (tmp_path / "results.json").write_text("{}")
    (tmp_path / "train.log").symlink_to("/etc/hostname")
    (tmp_path / "plots").symlink_to(tmp_path / ".hydra")
    found = {
        (p.name, folder)
        for p, folder in _artifacts(tmp_path, ("results.json", "train.log"), (".hydra", "plots"))
    }
    assert found == {("results.json", None), ("config.yaml", ".hydra")}


def test_a_tensorboard_folder_that_is_a_link_is_refused(tmp_path):
    pytest.importorskip("tensorboard")
    from contrastive_cli.tracking.tensorboard_tracker import TensorboardTracker
    from contrastive_cli.writer import UnsafePath

    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "tensorboard").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(UnsafePath, match="symbolic link"):
        TensorboardTracker().start(tmp_path, {}, {}, resumed=True)


def test_a_saved_cache_dir_never_decides_where_we_write(finished, tmp_path):
    from contrastive_cli.rundirs import load_run

    run = _copy(finished, tmp_path / "run")
    path = run / ".hydra" / "config.yaml"
    cfg = yaml.safe_load(path.read_text())
    cfg["data"]["cache_dir"] = str(tmp_path / "victim")
    path.write_text(yaml.safe_dump(cfg))
    overrides = run / ".hydra" / "overrides.yaml"
    recorded = yaml.safe_load(overrides.read_text())
    overrides.write_text(yaml.safe_dump([*recorded, f"data.cache_dir={tmp_path / 'victim'}"]))
    from omegaconf import OmegaConf

    rebuilt = load_run(run).config()
    assert OmegaConf.select(rebuilt, "data.cache_dir") is None
    assert "victim" not in OmegaConf.to_yaml(rebuilt)


# --------------------------------------------------------------------------- sizes and numbers
def test_deeply_nested_config_stalls_neither_eval_nor_runs(finished, tmp_path, capsys, bounded):
    tree = tmp_path / "tree"
    good = _copy(finished, tree / "good")
    bad = _copy(finished, tree / "bad")
    nested = "trainer: " + "[" * 20000 + "]" * 20000 + "\n"
    for name in ("config.yaml", "config_unresolved.yaml", "hydra.yaml"):
        (bad / ".hydra" / name).write_text(nested)
    started = time.monotonic()
    line = one_error_line(capsys, cli.main(["eval", str(bad)]))
    assert "nests" in line
    assert cli.main(["runs", str(tree)]) == 0
    out = capsys.readouterr().out
    assert str(good) in out and "unreadable" in out
    assert time.monotonic() - started < 10


@pytest.mark.parametrize("value", ["1e308", "Infinity", "-1e400", "NaN"])
def test_huge_or_infinite_numbers_in_results_do_not_crash_plot(
    finished, tmp_path, capsys, caplog, bounded, value
):
    tree = tmp_path / "tree"
    _copy(finished, tree / "a")
    b = _copy(finished, tree / "b")
    (b / ".hydra" / "overrides.yaml").write_text("- loss.temperature=0.3\n")
    text = (b / "results.json").read_text()
    results = json.loads(text)
    knn = next(iter(results["metrics"]))
    (b / "results.json").write_text(text.replace(json.dumps(results["metrics"][knn]), value, 1))
    lines = (b / "metrics.jsonl").read_text().splitlines()
    lines[0] = lines[0].replace('"loss": ', f'"loss": {value}, "x": ', 1)
    (b / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    code = cli.main(["plot", str(tree), "--no-embedding", "--out", str(tmp_path / "p")])
    out = capsys.readouterr()
    assert "Traceback" not in out.err + out.out
    assert code == 0, out.err  # the damaged run is left out of the curves, with a warning
    assert "left out" in caplog.text and (tmp_path / "p" / "curves.png").is_file()
    assert cli.main(["runs", str(tree)]) == 0
    assert "unreadable" in capsys.readouterr().out


def _forged_encoder(finished: Path, path: Path, widths: int) -> None:
    """The run's encoder file with metadata declaring other widths (tensors unchanged)."""
    data = (finished / "encoder.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])
    encoder = json.loads(header["__metadata__"]["encoder"])
    key = next(k for k, v in encoder.items() if isinstance(v, list) and v and isinstance(v[0], int))
    encoder[key] = [widths] * len(encoder[key])
    header["__metadata__"]["encoder"] = json.dumps(encoder)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + n :])


def test_huge_widths_in_metadata_are_refused_before_allocating(finished, tmp_path, capsys, bounded):
    """A 1.5 MB file made `eval` try to allocate 154 GB."""
    bare = tmp_path / "enc.safetensors"
    _forged_encoder(finished, bare, 200_000)
    started = time.monotonic()
    line = one_error_line(capsys, cli.main(["eval", str(bare)]), (1, 2))
    assert "does not fit" in line or "cannot be built" in line, line
    assert time.monotonic() - started < 10


def test_huge_widths_in_a_run_config_are_refused_before_allocating(
    finished, tmp_path, capsys, bounded
):
    run = _copy(finished, tmp_path / "run")
    path = run / ".hydra" / "config.yaml"  # the saved config and the override agree
    cfg = yaml.safe_load(path.read_text())
    key = next(k for k, v in cfg["encoder"].items() if isinstance(v, list) and v)
    cfg["encoder"][key] = [200_000] * len(cfg["encoder"][key])
    path.write_text(yaml.safe_dump(cfg))
    overrides = run / ".hydra" / "overrides.yaml"
    widths = ",".join(["200000"] * len(cfg["encoder"][key]))
    overrides.write_text(
        yaml.safe_dump([*yaml.safe_load(overrides.read_text()), f"encoder.{key}=[{widths}]"])
    )
    for args in (["eval", str(run)], ["embed", str(run), "--out", str(tmp_path / "e.npy")]):
        line = one_error_line(capsys, cli.main(args), (1, 2))
        assert "does not fit" in line, line


# --------------------------------------------------------------------------- the terminal
def test_runs_never_prints_control_characters_from_run_files(finished, tmp_path, capsys, bounded):
    tree = tmp_path / "tree"
    run = _copy(finished, tree / "run\x1b[2Jname")
    escape = "\x1b]0;owned\x07\x1b[2J\rforged"
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([f"loss.temperature={escape}"]))
    results = json.loads((run / "results.json").read_text())
    results.update(status=f"failed{escape}", error=escape)
    (run / "results.json").write_text(json.dumps(results))
    for args in (["runs", str(tree)], ["runs", str(tree), "--csv", "-"]):
        assert cli.main(args) == 0
        out = capsys.readouterr()
        text = out.out.replace("\r\n", "\n")  # CSV's own line ends
        assert not any(c in text + out.err for c in "\x1b\x07\r"), out.out
        assert "\\x1b" in out.out


def test_errors_never_print_control_characters(finished, tmp_path, capsys, bounded):
    run = _copy(finished, tmp_path / "run")
    for name in ("config.yaml", "config_unresolved.yaml"):
        (run / ".hydra" / name).write_text("trainer: [\x1b[2J unclosed\n")
    line = one_error_line(capsys, cli.main(["eval", str(run)]))
    assert "\x1b" not in line


# --------------------------------------------------------------------------- Hydra's writes
def test_a_refused_resume_through_train_changes_nothing(finished, tmp_path):
    run = _copy(finished, tmp_path / "run")
    (run / "results.json").unlink()
    before = snapshot(run)
    proc = run_cli(
        ["train", *CFG, f"hydra.run.dir={run}", "trainer.resume=true", "loss.temperature=0.3"],
        cwd=tmp_path,
        timeout=120,
    )
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "loss" in lines[0], proc.stderr
    assert snapshot(run) == before, "a refused resume changed the run directory"


def test_a_run_dir_reached_through_a_missing_folder_is_resolved(finished, tmp_path):
    """hydra.run.dir=<missing>/../<existing run> overwrote that run's config."""
    run = _copy(finished, tmp_path / "run")
    before = snapshot(run)
    proc = run_cli(
        ["train", *CFG, f"hydra.run.dir={tmp_path / 'missing' / '..' / 'run'}"],
        cwd=tmp_path,
        timeout=120,
    )
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "already holds a run" in lines[0]
    assert snapshot(run) == before
    assert not (tmp_path / "missing").exists()


# --------------------------------------------------------------------------- image folders
def test_fifos_devices_and_nested_link_loops_in_an_image_folder(tmp_path, bounded):
    from contrastive_cli.data.folder import scan
    from tests.image_folders import write_images

    root = tmp_path / "images"
    write_images(root, per_class=3, corrupt=False)
    os.mkfifo(root / "circle" / "pipe.png")
    (root / "circle" / "zero.png").symlink_to("/dev/zero")
    (root / "circle" / "a" / "b").mkdir(parents=True)
    (root / "circle" / "a" / "b" / "up").symlink_to("../..")
    (root / "circle" / "a" / "b" / "top").symlink_to(root)
    (root / "circle" / "a" / "self").symlink_to(".")
    (root / "square" / "loop1").symlink_to(root / "square" / "loop2")
    (root / "square" / "loop2").symlink_to(root / "square" / "loop1")
    found = [rel for rel, _, _ in scan(root, ["png", "jpg"])]
    assert len(found) == 6 and not any("pipe" in r or "zero" in r for r in found)


SIGTERM_SCRIPT = """
import sys, time
from pathlib import Path
from contrastive_cli.data.files import ImageFiles
from contrastive_cli.signals import GracefulStop, Interrupted

paths = sorted(str(p) for p in Path(sys.argv[1]).rglob("*.png")) * 400
try:
    with GracefulStop():  # as during evaluation: not graceful, a signal stops at once
        for i, batch in enumerate(ImageFiles(paths, 16, 3, workers=2).split(4)):
            if i == 2:
                print("decoding", flush=True)
            time.sleep(0.01)
except Interrupted as e:
    print(e, file=sys.stderr)
    sys.exit(e.exit_code)
"""


def test_sigterm_to_the_process_group_while_decoding_stops_without_a_traceback(tmp_path):
    """A SIGTERM to the process group during evaluation once gave a DataLoader traceback."""
    import subprocess
    import sys

    from tests.conftest import REPO
    from tests.image_folders import write_images

    write_images(tmp_path / "images", per_class=3, corrupt=False)
    proc = subprocess.Popen(
        [sys.executable, "-c", SIGTERM_SCRIPT, str(tmp_path / "images")],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        assert proc.stdout.readline().strip() == "decoding"
        os.killpg(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143, err
    assert "Traceback" not in err and "exited unexpectedly" not in err, err


def test_non_utf8_file_names_through_training_evaluation_and_every_embed_format(tmp_path, capsys):
    """Training crashed at evaluation (baselines.digest_images); embed to csv/parquet too."""
    from tests.image_folders import write_images

    images = tmp_path / "images"
    write_images(images, per_class=6, corrupt=False)
    odd = os.fsencode(images / "circle") + b"/caf\xe9\x1b[2J.png"
    os.rename(os.fsencode(images / "circle" / "img001.png"), odd)
    (images / "square" / os.fsdecode(b"bad\xff\x1b[2J.png")).write_bytes(b"not an image")
    run = tmp_path / "run"
    proc = run_cli(
        [
            "train",
            "data=folder",
            f"data.path={images}",
            "data.image_size=16",
            "data.workers=0",
            "trainer.epochs=1",
            "trainer.batch_size=8",
            "eval.probe.max_iter=10",
            "eval.plots=false",
            "eval.monitor_bank=10",
            "eval.monitor_queries=5",
            f"hydra.run.dir={run}",
        ],
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "bad\\xff" in proc.stdout and "\x1b" not in proc.stdout
    formats = ["csv", "npy"] + (["parquet"] if _has("pyarrow") else [])
    for fmt in formats:
        out = tmp_path / f"e.{fmt}"
        assert cli.main(["embed", str(run), "data.workers=0", "--out", str(out)]) == 0
        assert "Traceback" not in capsys.readouterr().err
    text = (tmp_path / "e.csv").read_text()
    assert "caf\\xe9" in text


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def test_a_refused_train_into_a_busy_run_changes_nothing(finished, tmp_path):
    """While another command holds RUN's lock, `train hydra.run.dir=RUN trainer.resume=true`
    rewrote RUN's saved config (Hydra) and recorded a failure in its results.json."""
    import subprocess
    import sys

    from tests.conftest import REPO

    run = _copy(finished, tmp_path / "run")
    (run / "results.json").unlink()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time, pathlib, contrastive_cli.writer as w;"
            f"cm = w.lock(pathlib.Path({str(run)!r}), 'resume'); cm.__enter__();"
            "print('locked', flush=True); time.sleep(120)",
        ],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = snapshot(run)
        proc = run_cli(
            ["train", *CFG, f"hydra.run.dir={run}", "trainer.resume=true", "trainer.log_every=5"],
            cwd=tmp_path,
            timeout=120,
        )
    finally:
        holder.kill()
        holder.wait()
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 1 and len(lines) == 1 and "in use" in lines[0], proc.stderr
    assert snapshot(run) == before


def test_resuming_through_train_keeps_the_saved_config_and_leaves_no_staging(finished, tmp_path):
    """Hydra's .hydra files for `train hydra.run.dir=RUN trainer.resume=true` go to a
    temporary folder, removed afterwards; RUN keeps its saved config, as with `resume`."""
    run = _copy(finished, tmp_path / "run")
    (run / "results.json").unlink()
    hydra_before = {p.name: p.read_bytes() for p in (run / ".hydra").iterdir()}
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    proc = run_cli(
        ["train", *CFG, f"hydra.run.dir={run}", "trainer.resume=true", "trainer.log_every=5"],
        cwd=tmp_path,
        env={"TMPDIR": str(scratch)},
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads((run / "results.json").read_text())["status"] == "completed"
    assert {p.name: p.read_bytes() for p in (run / ".hydra").iterdir()} == hydra_before
    assert not any(p.name.startswith("contrast-hydra-") for p in scratch.iterdir())

"""contrast embed: one row per image, the encoder's dimension, the same features as in-process."""

from __future__ import annotations

import csv
import stat
import sys

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from contrastive_cli import cli
from contrastive_cli.commands.embed import GROUPS, KEYS
from contrastive_cli.config import apply_overrides, build
from contrastive_cli.evaluate import extract_features
from contrastive_cli.parts import build_encoder, load_data
from contrastive_cli.rundirs import load_run
from tests.conftest import TINY, run_cli, run_dirs
from tests.image_folders import write_images


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished one-epoch run on a labelled folder (16 px RGB), and an unlabelled folder."""
    root = tmp_path_factory.mktemp("embed")
    write_images(root / "labelled", per_class=12)  # 24 readable + broken.png
    write_images(root / "flat", classes=None, per_class=9, corrupt=False, seed=1)
    run_cli(
        [
            "train",
            "data=folder",
            f"data.path={root / 'labelled'}",
            "data.image_size=16",
            *TINY,
            "trainer.epochs=1",
            "trainer.batch_size=8",
            "eval.baselines=false",
        ],
        cwd=root,
        check=True,
    )
    [run] = run_dirs(root / "outputs")
    return root, run


def in_process(run, overrides=()):
    """{path or index: features} computed here, without the embed command's code."""
    run_cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
    cfg = apply_overrides(load_run(run).config(), overrides, GROUPS, KEYS, "contrast embed")
    encoder = build_encoder(run_cfg, 0)
    encoder.load_state_dict(load_file(str(run / "encoder.safetensors")))
    normalize = build(run_cfg.data.augment).normalize
    features = {}
    for split in load_data(cfg).named_splits().values():
        feats = extract_features(encoder, split.images, normalize, torch.device("cpu"))
        ids = split.paths or range(len(split))
        features.update(dict(zip(ids, feats.numpy(), strict=True)))
    return features, encoder.out_dim


def embed(*args: str) -> int:
    return cli.main(["embed", *map(str, args)])


def test_parquet_has_one_row_per_image_and_the_in_process_features(trained, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    _, run = trained
    out = tmp_path / "e.parquet"
    assert embed(run, "--out", out) == 0  # the run's own data and splits
    table = pq.read_table(out).to_pydict()
    expected, dim = in_process(run)
    assert len(table["path"]) == len(expected) == 24 and len(set(table["path"])) == 24
    assert set(table["split"]) == {"train", "test"}
    assert all(table["class"][i] == p.split("/")[-2] for i, p in enumerate(table["path"]))
    assert all(len(e) == dim for e in table["embedding"])
    for path, vector in zip(table["path"], table["embedding"], strict=True):
        np.testing.assert_allclose(vector, expected[path], rtol=1e-5, atol=1e-6)


def test_npy_and_csv_for_another_folder(trained, tmp_path):
    root, run = trained
    overrides = [f"data.path={root / 'flat'}"]
    expected, dim = in_process(run, overrides)
    assert embed(run, *overrides, "--out", tmp_path / "e.npy") == 0
    table = np.load(tmp_path / "e.npy")  # no pickle needed
    assert table.shape == (9,) and table["embedding"].shape == (9, dim)
    assert (table["label"] == -1).all() and set(table["split"]) == {"pretrain"}
    for path, vector in zip(table["path"], table["embedding"], strict=True):
        np.testing.assert_allclose(vector, expected[str(path)], rtol=1e-5, atol=1e-6)
    assert embed(run, *overrides, "--out", tmp_path / "e.csv") == 0
    with (tmp_path / "e.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert (
        len(rows) == 9
        and rows[0]["label"] == ""
        and f"e{dim - 1}" in rows[0]
        and f"e{dim}" not in rows[0]
    )
    for row in rows:
        vector = np.array([float(row[f"e{i}"]) for i in range(dim)], dtype=np.float32)
        np.testing.assert_allclose(vector, expected[row["path"]], rtol=1e-5, atol=1e-6)


def test_the_command_line_with_a_data_group_override(trained, tmp_path):
    root, run = trained
    out = tmp_path / "e.npy"
    proc = run_cli(
        [
            "embed",
            str(run),
            "data=folder",
            "data.image_size=16",
            f"data.path={root / 'flat'}",
            "--out",
            str(out),
        ],
        cwd=tmp_path,
        check=True,
    )
    assert "wrote 9 embeddings of dimension" in proc.stdout
    assert np.load(out).shape == (9,)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--out", "{tmp}/e.txt"],
            "the extension .txt is not allowed; allowed: .parquet, .npy, .csv",
        ),
        (["--out", "{tmp}/missing/e.npy"], "does not exist"),
        (
            ["data=digits", "--out", "{tmp}/e.npy"],
            "takes 3x16x16 images but data=digits has data.channels=1",
        ),
        (["data.image_size=32", "--out", "{tmp}/e.npy"], "set data.channels=3 data.image_size=16"),
        (["encoder=mlp", "--out", "{tmp}/e.npy"], "contrast embed takes only data=..."),
        (["trainer.epochs=3", "--out", "{tmp}/e.npy"], "contrast embed takes only data=..."),
        (
            ["data=imagenet", "--out", "{tmp}/e.npy"],
            "data=imagenet is not an option; options: cifar10",
        ),
        (["data.nope=1", "--out", "{tmp}/e.npy"], "data.nope is not a setting of data=folder"),
        (["data.path=x=(", "--out", "{tmp}/e.npy"], "cannot parse the override"),
        ([], "the following arguments are required: --out"),
    ],
)
def test_bad_arguments_are_one_line_errors(trained, tmp_path, capsys, args, message):
    _, run = trained
    code = embed(run, *(a.format(tmp=tmp_path) for a in args))
    err = capsys.readouterr().err
    assert code == 2
    [line] = [ln for ln in err.splitlines() if ln.strip()]
    assert message in line


def test_missing_run_dir_and_weights(trained, tmp_path, capsys):
    assert embed(tmp_path / "nowhere", "--out", tmp_path / "e.npy") == 2
    assert "RUN_DIR=" in capsys.readouterr().err
    _, run = trained
    partial = tmp_path / "partial"
    (partial / ".hydra").mkdir(parents=True)
    for name in ("config.yaml", "overrides.yaml"):  # the record a config is rebuilt from
        (partial / ".hydra" / name).write_text((run / ".hydra" / name).read_text())
    assert embed(partial, "--out", tmp_path / "e.npy") == 1
    assert "encoder.safetensors is missing" in capsys.readouterr().err


def test_parquet_without_pyarrow_is_a_one_line_error(trained, tmp_path, capsys, monkeypatch):
    _, run = trained
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow -> ImportError
    assert embed(run, "--out", tmp_path / "e.parquet") == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "writing parquet needs pyarrow" in line and ".npy or .csv" in line


def test_everything_a_run_and_embed_write_is_readable_like_results(trained, tmp_path):
    """Checkpoints, weights and embeddings were written 0600 (mkstemp) while results.json
    was 0644: every file is now readable by the group and others, as the results are."""
    _, run = trained
    out = tmp_path / "e.npy"
    assert embed(run, "--out", out) == 0
    files = [p for p in run.rglob("*") if p.is_file()] + [out]
    assert any(p.suffix == ".pt" for p in files) and any(p.suffix == ".safetensors" for p in files)
    unreadable = [p for p in files if stat.S_IMODE(p.stat().st_mode) & 0o644 != 0o644]
    assert not unreadable, [(str(p), oct(p.stat().st_mode)) for p in unreadable]

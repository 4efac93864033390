"""Data that cannot be had: missing, unreadable, or a download that fails offline; one line each."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from contrastive_cli.data.sources import load_cifar, load_idx_dataset
from contrastive_cli.errors import DataError
from contrastive_cli.parts import load_data
from tests.conftest import run_cli
from tests.fakes import write_mnist
from tests.faults import offline_downloader

IDX = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
]


def _fake_mnist(root: Path) -> Path:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in IDX:
        (raw / name).write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x00")  # valid empty IDX headers
    return raw


def test_failed_download_is_one_line():
    for load in (
        lambda: load_idx_dataset(
            "/nonexistent/contrast-test", True, "MNIST", "mnist", offline_downloader
        ),
        lambda: load_cifar(
            "/nonexistent/contrast-test",
            True,
            "cifar-10-batches-py",
            "cifar10",
            ["data_batch_1"],
            ["test_batch"],
            "labels",
            10,
            offline_downloader,
        ),
    ):
        with pytest.raises(DataError) as info:
            load()
        message = str(info.value)
        assert "download" in message and "name resolution" in message and "\n" not in message


def test_failed_download_through_the_cli(tmp_path):
    proc = run_cli(
        [
            "train",
            "data=mnist",
            f"data.root={tmp_path / 'data'}",
            "data.download=true",
            "data.source.downloader._target_=tests.faults.offline_downloader",
        ],
        cwd=tmp_path,
        # One's own code in a slot is allowed on one's own machine, through this variable.
        env={"CONTRAST_EXTRA_TARGETS": "data.source.downloader=tests.faults.offline_downloader"},
        timeout=300,
    )
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 1 and len(lines) == 1, proc.stderr
    assert (
        lines[0].startswith("error: data=mnist: download into") and "Traceback" not in proc.stderr
    )
    # Without internet the user learns which files to put where.
    assert "train-images-idx3-ubyte[.gz]" in lines[0]
    assert str(tmp_path / "data" / "MNIST" / "raw") in lines[0]
    # the failed download leaves no empty data/MNIST/raw, the failed run no run directory
    assert not (tmp_path / "data").exists()
    assert not [p for p in (tmp_path / "outputs").rglob("*") if p.is_file()]


def test_unreadable_data_file_is_one_line(tmp_path, monkeypatch, compose_cfg):
    raw = _fake_mnist(tmp_path)
    real_read = Path.read_bytes

    def read_bytes(self: Path) -> bytes:
        if self.parent == raw:
            raise PermissionError(13, "Permission denied", str(self))
        return real_read(self)

    monkeypatch.setattr(Path, "read_bytes", read_bytes)
    with pytest.raises(DataError) as info:
        load_data(compose_cfg("data=mnist", f"data.root={tmp_path}", "data.download=false"))
    message = str(info.value)
    assert message.startswith("data=mnist: cannot read") and "Permission denied" in message
    assert str(raw) in message and "\n" not in message


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their permissions")
def test_unreadable_data_file_through_the_cli(tmp_path):
    raw = _fake_mnist(tmp_path / "data")
    (raw / IDX[0]).chmod(0)
    proc = run_cli(
        ["train", "data=mnist", f"data.root={tmp_path / 'data'}", "data.download=false"],
        cwd=tmp_path,
        timeout=300,
    )
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 1 and len(lines) == 1 and "Permission denied" in lines[0], proc.stderr


def test_the_system_dataset_folder_is_a_switch(no_datasets, compose_cfg, tmp_path):
    """``CONTRAST_SYSTEM_DATA`` replaces /usr/share/datasets (Debian's dataset packages), so
    CI (``.ci/run``) can hide an installed Fashion-MNIST; files there are found offline."""
    cfg = compose_cfg("data=fashion_mnist", "data.download=false")
    assert list(cfg.data.source.extra_dirs) == [f"{no_datasets}/fashion-mnist"]
    with pytest.raises(DataError, match="data=fashion_mnist"):
        load_data(cfg)
    debian = tmp_path / "debian"
    write_mnist(debian / "fashion-mnist")
    os.environ["CONTRAST_SYSTEM_DATA"] = str(debian)  # restored by the fixture's monkeypatch
    data = load_data(compose_cfg("data=fashion_mnist", "data.download=false"))
    assert data.train.images.shape == (6, 1, 28, 28)
    assert not any(no_datasets.iterdir())

"""data=stl10: the loader on tiny files in torchvision's binary format, written here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from contrastive_cli.data.sources import load_stl10
from contrastive_cli.errors import ConfigError, DataError
from tests.conftest import TINY, read_results, run_cli, run_dirs

SIZES = {"unlabeled": 20, "train": 12, "test": 10}


def write_stl10(root: Path, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray | None]]:
    """stl10_binary/*_X.bin (each image channel by channel, column-major) and *_y.bin
    (labels 1-10). Returns {split: (images (N, 3, 96, 96) row-major, labels 0-9)}."""
    rng = np.random.default_rng(seed)
    folder = root / "stl10_binary"
    folder.mkdir(parents=True, exist_ok=True)
    written = {}
    for split, n in SIZES.items():
        images = rng.integers(0, 256, size=(n, 3, 96, 96), dtype=np.uint8)
        images[:, 0, :8, :] = 0  # a dark band along the top rows
        (folder / f"{split}_X.bin").write_bytes(
            np.ascontiguousarray(images.transpose(0, 1, 3, 2)).tobytes()
        )
        labels = None
        if split != "unlabeled":
            labels = np.arange(n) % 10
            (folder / f"{split}_y.bin").write_bytes((labels + 1).astype(np.uint8).tobytes())
        written[split] = (images, labels)
    return written


def test_loader_reads_torchvisions_format(tmp_path, monkeypatch):
    written = write_stl10(tmp_path)
    data = load_stl10(str(tmp_path), download=False, name="stl10")
    assert data.pretrain.labels is None and data.labelled and data.num_classes == 10
    for split, (images, labels) in written.items():
        got = getattr(data, "pretrain" if split == "unlabeled" else split)
        assert got.images.dtype == torch.uint8 and tuple(got.images.shape) == (
            SIZES[split],
            3,
            96,
            96,
        )
        assert torch.equal(got.images, torch.from_numpy(images))
        assert (got.images[:, 0, :8, :] == 0).all()  # rows and columns the right way round
        if labels is not None:
            assert got.labels.tolist() == labels.tolist()
    # torchvision's own reader agrees (its md5 check would reject these tiny files)
    monkeypatch.setattr(torchvision.datasets.STL10, "_check_integrity", lambda self: True)
    reference = torchvision.datasets.STL10(str(tmp_path), split="test")
    assert np.array_equal(reference.data, data.test.images.numpy())
    assert np.array_equal(reference.labels, data.test.labels.numpy())


def test_pretrain_split_choices(tmp_path):
    write_stl10(tmp_path)
    train = load_stl10(str(tmp_path), download=False, name="stl10", pretrain_split="train")
    assert train.pretrain is train.train
    both = load_stl10(str(tmp_path), download=False, name="stl10", pretrain_split="train+unlabeled")
    assert len(both.pretrain) == 32 and both.pretrain.labels is None
    with pytest.raises(ConfigError, match=r"data\.pretrain_split='test' is not allowed"):
        load_stl10(str(tmp_path), download=False, name="stl10", pretrain_split="test")


def test_missing_files_name_them_and_where_to_put_them(tmp_path):
    write_stl10(tmp_path)
    (tmp_path / "stl10_binary" / "unlabeled_X.bin").unlink()
    with pytest.raises(DataError) as e:
        load_stl10(str(tmp_path), download=False, name="stl10", url="URL")
    message = str(e.value)
    assert "\n" not in message
    assert "unlabeled_X.bin" in message and "train_X.bin" not in message
    assert (
        str(tmp_path / "stl10_binary") in message
        and "URL" in message
        and "data.download=true" in message
    )


def test_download_uses_torchvision_and_failures_are_one_line(tmp_path):
    calls = []

    def fake_stl10(root, download, split):
        calls.append((root, download, split))
        write_stl10(Path(root))

    data = load_stl10(str(tmp_path), download=True, name="stl10", downloader=fake_stl10)
    assert calls == [(str(tmp_path), True, "train")] and len(data.pretrain) == 20

    def offline(**kwargs):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    with pytest.raises(DataError, match=r"data=stl10: download into .* failed \(\[Errno -3\]"):
        load_stl10(str(tmp_path / "empty"), download=True, name="stl10", downloader=offline)


def test_truncated_files_are_data_errors(tmp_path):
    write_stl10(tmp_path)
    (tmp_path / "stl10_binary" / "test_X.bin").write_bytes(b"\0" * 1000)
    with pytest.raises(DataError, match="not a whole number of 3x96x96 STL-10 images"):
        load_stl10(str(tmp_path), download=False, name="stl10")


def test_train_on_stl10_end_to_end(tmp_path):
    write_stl10(tmp_path / "data")
    run_cli(
        [
            "train",
            "data=stl10",
            f"data.root={tmp_path / 'data'}",
            "data.download=false",
            *TINY,
            "trainer.batch_size=8",
            "trainer.epochs=1",
        ],
        cwd=tmp_path,
        check=True,
    )
    [run] = run_dirs(tmp_path / "outputs")
    results = read_results(run)
    assert (
        results["status"] == "completed" and results["steps"] == 2
    )  # 20 unlabelled images, batch 8
    assert 0.0 <= results["metrics"]["linear_top1"] <= 1.0

"""data=folder: layouts, decoding, corrupt files, the cache, streaming batches, the CLI."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from contrastive_cli.config import expand_home
from contrastive_cli.data import folder as folder_module
from contrastive_cli.data.batches import InMemoryBatches, StreamingBatches, batches_of
from contrastive_cli.data.files import ImageFiles, decode
from contrastive_cli.data.folder import cache_file, load_folder
from contrastive_cli.errors import ConfigError, DataError
from tests.conftest import TINY, read_results, run_cli, run_dirs
from tests.image_folders import truncate, write_images

FOLDER_TINY = [*TINY, "data=folder", "data.image_size=16", "trainer.batch_size=8"]


def load(path, **kwargs):
    return load_folder(str(path), image_size=16, workers=0, **kwargs)


# --------------------------------------------------------------------------- end to end
def test_labelled_folder_trains_and_evaluates_skipping_the_corrupt_file(tmp_path):
    write_images(tmp_path / "photos", per_class=20)
    proc = run_cli(
        ["train", *FOLDER_TINY, f"data.path={tmp_path / 'photos'}", "data.workers=1"],
        cwd=tmp_path,
        check=True,
    )
    assert "skipped 1 of 41 files" in proc.stdout and "broken.png" in proc.stdout
    [run] = run_dirs(tmp_path / "outputs")
    results = read_results(run)
    assert results["status"] == "completed" and results["data"] == "folder"
    for key in ("knn_k200", "knn_k20", "linear_top1"):
        assert 0.0 <= results["metrics"][key] <= 1.0
    assert "broken.png" in (run / "train.log").read_text()


def test_unlabelled_folder_ends_with_the_label_free_metrics_of_encoder_and_baselines(tmp_path):
    write_images(tmp_path / "photos", classes=None, per_class=24)
    proc = run_cli(
        ["train", *FOLDER_TINY, f"data.path={tmp_path / 'photos'}", "data.cache=true"],
        cwd=tmp_path,
        check=True,
    )
    assert "without class subfolders" in proc.stdout
    [run] = run_dirs(tmp_path / "outputs")
    results = read_results(run)
    assert results["status"] == "completed"
    entries = [results["metrics"], results["baselines"]["raw_pixels"]]
    entries.append(results["baselines"]["random_init"])
    for metrics in entries:  # never only "skipped": each encoder and baseline measured
        assert metrics["rankme"] >= 1.0 and 0.0 <= metrics["alignment"] <= 4.0
        assert -4.0 <= metrics["uniformity"] <= 0.0 and "knn_k200" not in metrics
    assert "rankme_projector" in results["metrics"]  # ntxent has a projector
    assert "RankMe" in proc.stdout and "raw pixels" in proc.stdout  # the printed table
    assert "k-NN, the probes and retrieval are skipped" in results["eval_skipped"]
    # ... and the run has a curve without labels
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert "rankme" in records[-1] and "knn" not in records[-1]
    assert (tmp_path / "photos" / ".contrast-cache" / "16px-3ch.safetensors").is_file()


def test_a_missing_folder_is_a_one_line_error(tmp_path):
    proc = run_cli(["train", "data=folder", "data.path=nowhere"], cwd=tmp_path)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    [line] = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert line == "error: data.path=nowhere: no such folder"


@pytest.mark.parametrize(
    ("path", "kwargs", "message"),
    [
        (None, {}, "data.path is not set: data=folder needs data.path=<folder of images>"),
        (".", {"channels": 4}, "data.channels=4 is not allowed; allowed: 1 (greyscale) or 3 (RGB)"),
        (".", {"image_size": 0}, "data.image_size=0 is not allowed"),
        (".", {"test_fraction": 1.0}, "data.test_fraction=1.0 is not allowed"),
        (".", {"workers": -1}, "data.workers=-1 is not allowed"),
    ],
)
def test_bad_folder_settings_name_the_setting(path, kwargs, message):
    with pytest.raises(ConfigError) as e:
        load_folder(path, **kwargs)
    assert message in str(e.value)


def test_a_file_is_not_a_folder(tmp_path):
    (tmp_path / "x.png").write_bytes(b"")
    with pytest.raises(DataError, match=r"x\.png: not a folder"):
        load(tmp_path / "x.png")


# --------------------------------------------------------------------------- layouts
def test_class_subfolders_give_a_fixed_stratified_split(tmp_path):
    write_images(tmp_path, classes=("a", "b", "c"), per_class=10, corrupt=False)
    data = load(tmp_path)
    again = load(tmp_path)
    assert data.class_names == ["a", "b", "c"] and data.num_classes == 3
    assert data.pretrain is data.train  # test images stay out of training
    assert len(data.train) == 24 and len(data.test) == 6  # 2 of each class held out
    assert torch.bincount(data.test.labels).tolist() == [2, 2, 2]
    assert data.test.paths == again.test.paths  # fixed, not run-seeded
    assert not set(data.train.paths) & set(data.test.paths)
    assert all(
        p.split("/")[-2] == data.class_names[y]
        for p, y in zip(data.test.paths, data.test.labels.tolist(), strict=True)
    )


def test_train_and_test_subfolders_are_the_split(tmp_path):
    write_images(tmp_path / "train", classes=("a", "b"), per_class=6, corrupt=False)
    write_images(tmp_path / "test", classes=("a", "b"), per_class=3, corrupt=False, seed=1)
    data = load(tmp_path)
    assert data.class_names == ["a", "b"]
    assert len(data.train) == 12 and len(data.test) == 6
    assert all("/test/" in p for p in data.test.paths) and all(
        "/train/" in p for p in data.train.paths
    )


def test_eval_path_evaluates_unlabelled_training_data(tmp_path, caplog):
    write_images(tmp_path / "photos", classes=None, per_class=12, corrupt=False)
    write_images(tmp_path / "labelled", classes=("a", "b"), per_class=10, corrupt=False)
    data = load(tmp_path / "photos", eval_path=str(tmp_path / "labelled"))
    assert len(data.pretrain) == 12 and data.pretrain.labels is None
    assert data.labelled and data.num_classes == 2 and len(data.train) + len(data.test) == 20
    with pytest.raises(ConfigError, match=r"data.eval_path=.*has no class subfolders"):
        load(tmp_path / "labelled", eval_path=str(tmp_path / "photos"))


def test_unlabelled_and_empty_folders(tmp_path):
    write_images(tmp_path / "flat", classes=None, per_class=5, corrupt=False)
    data = load(tmp_path / "flat")
    assert not data.labelled and data.pretrain.labels is None and len(data.pretrain) == 5
    (tmp_path / "empty" / ".hidden").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(tmp_path / "empty" / ".hidden" / "x.png")  # hidden: ignored
    (tmp_path / "empty" / "notes.txt").write_text("not an image")
    with pytest.raises(DataError, match=r"data.path=.*empty: no images found"):
        load(tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "x.png").write_bytes(b"junk")
    with pytest.raises(DataError, match="none of the 1 image files can be read"):
        load(tmp_path / "bad")


# --------------------------------------------------------------------------- decoding
def test_decode_converts_modes_and_sizes(tmp_path):
    rgba = np.zeros((10, 20, 4), dtype=np.uint8)  # fully transparent -> white
    Image.fromarray(rgba, "RGBA").save(tmp_path / "clear.png")
    assert (decode(str(tmp_path / "clear.png"), 8, 3) == 255).all()
    wide = np.zeros((10, 30), dtype=np.uint8)
    wide[:, 10:20] = 200  # the centre third is bright
    Image.fromarray(wide, "L").save(tmp_path / "wide.png")
    out = decode(str(tmp_path / "wide.png"), 10, 3)  # shorter side, centre crop
    assert out.shape == (3, 10, 10) and out.dtype == np.uint8 and out.min() >= 190
    Image.fromarray(np.full((9, 9), 65535, dtype=np.uint16)).save(tmp_path / "deep.png")
    assert (decode(str(tmp_path / "deep.png"), 4, 1) == 255).all()  # 16-bit scaled, not clipped
    Image.fromarray(np.full((5, 7, 3), (255, 0, 0), dtype=np.uint8)).convert("P").save(
        tmp_path / "pal.gif"
    )
    red = decode(str(tmp_path / "pal.gif"), 4, 3)
    assert red.shape == (3, 4, 4) and (red[0] > 240).all() and (red[1:] < 15).all()
    grey = decode(str(tmp_path / "pal.gif"), 4, 1)
    assert grey.shape == (1, 4, 4) and abs(int(grey[0, 0, 0]) - 76) <= 2  # ITU-R 601 luma of red


def test_decode_applies_exif_rotation(tmp_path):
    stored = np.zeros((10, 20), dtype=np.uint8)
    stored[:, :10] = 255  # left half white as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to view"
    Image.fromarray(stored, "L").save(tmp_path / "phone.jpg", exif=exif, quality=95)
    out = decode(str(tmp_path / "phone.jpg"), 10, 1)[0]
    assert out[0].min() > 200 and out[-1].max() < 50  # viewed: the top is white


def test_a_truncated_file_is_replaced_when_streaming_and_dropped_from_the_cache(tmp_path, caplog):
    paths = write_images(tmp_path, classes=None, per_class=8, corrupt=False)
    png = next(p for p in paths if p.suffix == ".png")
    truncate(png)
    with caplog.at_level(logging.WARNING):
        streamed = load(tmp_path)
        assert len(streamed.pretrain) == 8  # the header still opens
        images = torch.cat(list(streamed.pretrain.images.split(3)))
    assert images.shape == (8, 3, 16, 16)
    assert f"cannot decode {png}" in caplog.text
    cached = load(tmp_path, cache=True)
    assert len(cached.pretrain) == 7 and str(png) not in cached.pretrain.paths
    assert "skipped 1 of 8" in caplog.text


# --------------------------------------------------------------------------- streaming and the cache
def test_streamed_and_cached_folders_give_the_same_batches(tmp_path):
    write_images(tmp_path, per_class=10)
    streamed, cached = load(tmp_path), load(tmp_path, cache=True)
    assert isinstance(streamed.train.images, ImageFiles) and isinstance(
        cached.train.images, torch.Tensor
    )
    assert streamed.train.paths == cached.train.paths
    assert torch.equal(torch.cat(list(streamed.train.images.split(7))), cached.train.images)
    a = batches_of(streamed.train, 4, seed=3, device=torch.device("cpu"))
    b = batches_of(cached.train, 4, seed=3, device=torch.device("cpu"))
    assert (
        isinstance(a, StreamingBatches) and isinstance(b, InMemoryBatches) and len(a) == len(b) == 4
    )
    for (xa, ya), (xb, yb) in zip(a.epoch(1), b.epoch(1), strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    resumed = list(a.epoch(1, start=2))  # resume at batch 2 of epoch 1
    assert len(resumed) == 2
    assert torch.equal(resumed[0][0], list(b.epoch(1))[2][0])
    with pytest.raises(
        ValueError, match=r"trainer\.batch_size=64 is larger than the 16 training images"
    ):
        batches_of(streamed.train, 64, seed=0, device=torch.device("cpu"))


def test_streaming_through_worker_processes(tmp_path):
    write_images(tmp_path, classes=None, per_class=9, corrupt=False)
    inline = load(tmp_path).pretrain.images
    workers = ImageFiles(inline.paths, 16, 3, workers=2)
    assert torch.equal(torch.cat(list(workers.split(4))), torch.cat(list(inline.split(4))))


def test_the_cache_is_reused_and_rebuilt_when_stale(tmp_path, monkeypatch):
    write_images(tmp_path, classes=None, per_class=6, corrupt=False)
    first = load(tmp_path, cache=True)
    file = cache_file(tmp_path, 16, 3, None)
    assert file.is_file()

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded although the cache is fresh")

    monkeypatch.setattr(ImageFiles, "decode_all", no_decoding)
    assert torch.equal(load(tmp_path, cache=True).pretrain.images, first.pretrain.images)
    monkeypatch.undo()
    Image.new("RGB", (20, 20), (9, 9, 9)).save(tmp_path / "new.png")  # the file list changed
    assert len(load(tmp_path, cache=True).pretrain) == 7
    assert len(load_folder(str(tmp_path), image_size=8, cache=True, workers=0).pretrain) == 7
    assert cache_file(tmp_path, 8, 3, None).is_file()  # one file per size/channels
    elsewhere = tmp_path.parent / f"{tmp_path.name}-cache"
    load(tmp_path, cache=True, cache_dir=str(elsewhere))
    assert cache_file(tmp_path, 16, 3, str(elsewhere)).is_file()


def test_cache_falls_back_to_streaming_when_too_large(tmp_path, monkeypatch, caplog):
    write_images(tmp_path, classes=None, per_class=4, corrupt=False)
    monkeypatch.setattr(folder_module, "_physical_memory", lambda: 1000)
    with caplog.at_level(logging.WARNING):
        data = load(tmp_path, cache=True)
    assert isinstance(data.pretrain.images, ImageFiles) and "streaming them instead" in caplog.text


def test_home_is_expanded_in_overrides():
    home = expand_home("data.path=~")[len("data.path=") :]
    assert not home.startswith("~")
    assert expand_home("data.path=~/photos") == f"data.path={home}/photos"
    assert expand_home("~data.path") == "~data.path" and expand_home("loss=ntxent") == "loss=ntxent"


# --------------------------------------------------------------------------- odd folders
def _png_declaring(path, width: int, height: int) -> None:
    """A 70-byte PNG whose header declares ``width`` x ``height`` pixels."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0"))
        + chunk(b"IEND", b"")
    )


def test_symlinks_are_followed_once_per_real_folder_and_file(tmp_path):
    """A link back to a parent does not loop; a folder or file reached twice counts once, so
    no image is trained on twice or sits in both train and test."""
    root = tmp_path / "photos"
    write_images(root, classes=("a", "b"), per_class=10, corrupt=False)
    (root / "a" / "loop").symlink_to(root)  # a cycle
    (root / "b" / "again").symlink_to(root / "b")  # the same folder twice
    (root / "b" / "twin.png").symlink_to(root / "a" / "img000.png")  # one file in two classes
    data = load(root)
    paths = data.train.paths + data.test.paths
    assert len(paths) == 20
    real = [str(Path(p).resolve()) for p in paths]
    assert len(set(real)) == len(real)
    assert not {str(Path(p).resolve()) for p in data.train.paths} & {
        str(Path(p).resolve()) for p in data.test.paths
    }


def test_an_image_declaring_too_many_pixels_is_skipped_with_a_clear_message(tmp_path, caplog):
    root = tmp_path / "photos"
    write_images(root, classes=("a", "b"), per_class=10, corrupt=False)
    _png_declaring(root / "a" / "bomb.png", 60000, 60000)
    with caplog.at_level(logging.WARNING):
        data = load(root)
    assert len(data.train) + len(data.test) == 20
    assert "bomb.png (declares 60000x60000 = 3,600,000,000 pixels, more than data.max_pixels=" in (
        caplog.text
    )
    with caplog.at_level(logging.WARNING):  # the cap is a setting; a lower one skips more
        data = load(root, max_pixels=12 * 12 * 4)
    assert len(data.train) + len(data.test) < 20
    with pytest.raises(ConfigError, match=r"data.max_pixels=0 is not allowed"):
        load(root, max_pixels=0)


def test_a_one_image_folder_says_it_needs_two(tmp_path):
    write_images(tmp_path / "one", classes=None, per_class=1, corrupt=False)
    proc = run_cli(["train", *FOLDER_TINY, f"data.path={tmp_path / 'one'}"], cwd=tmp_path)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "has 1 training image" in lines[0] and "at least 2" in lines[0]

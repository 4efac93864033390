"""Dataset loaders on tiny files written here in the original formats. Nothing is downloaded:
every call has download=False or a fake downloader."""

from __future__ import annotations

import gzip
import math
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from contrastive_cli.data.sources import load_cifar, load_digits, load_idx_dataset
from contrastive_cli.errors import DataError
from tests.fakes import write_cifar, write_cifar_batch, write_idx, write_mnist

IDX_NAMES = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
]
CIFAR10_FILES = ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5"]


# --------------------------------------------------------------------------- digits
def test_digits_split_sizes_types_and_shape():
    data = load_digits()
    assert (len(data.train), len(data.test)) == (1437, 360) and data.num_classes == 10
    for split in (data.train, data.test):
        assert split.images.dtype == torch.uint8 and split.images.shape[1:] == (1, 8, 8)
        assert split.labels.dtype == torch.int64 and set(split.labels.tolist()) == set(range(10))
    assert data.train.images.max() == 255  # 0..16 scaled to 0..255
    assert data.pretrain is data.train and data.labelled


def test_digits_train_and_test_partition_the_dataset():
    """Together the splits hold every image of scikit-learn's digits exactly once."""
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    full = np.rint(bunch.images * (255 / 16)).astype(np.uint8)
    rows = lambda images, labels: sorted(  # noqa: E731
        (img.tobytes(), int(y)) for img, y in zip(images, labels, strict=True)
    )
    data = load_digits()
    both = np.concatenate([data.train.images.numpy(), data.test.images.numpy()])[:, 0]
    labels = np.concatenate([data.train.labels.numpy(), data.test.labels.numpy()])
    assert rows(both, labels) == rows(full, bunch.target)
    # Stratified: each class puts 20% of its images, rounded down or up, in the test split.
    for c in range(10):
        share = int((bunch.target == c).sum()) * 0.2
        assert int((data.test.labels == c).sum()) in (math.floor(share), math.ceil(share))


def test_digits_split_is_deterministic():
    a, b = load_digits(), load_digits()
    assert torch.equal(a.test.images, b.test.images) and torch.equal(a.test.labels, b.test.labels)
    assert not torch.equal(load_digits(split_seed=1).test.labels, a.test.labels)


# --------------------------------------------------------------------------- MNIST family
def load_idx(root: Path, folder: str = "MNIST", **kwargs: object):
    return load_idx_dataset(
        root=str(root), download=False, folder=folder, name=folder.lower(), **kwargs
    )


def assert_matches(data, arrays: dict[str, np.ndarray]) -> None:
    for split, prefix in ((data.train, "train"), (data.test, "t10k")):
        assert split.images.dtype == torch.uint8 and split.labels.dtype == torch.int64
        assert np.array_equal(split.images.numpy()[:, 0], arrays[f"{prefix}-images-idx3-ubyte"])
        assert np.array_equal(split.labels.numpy(), arrays[f"{prefix}-labels-idx1-ubyte"])
    assert data.pretrain is data.train and data.num_classes == 10


@pytest.mark.parametrize("folder", ["MNIST", "FashionMNIST"])
@pytest.mark.parametrize("gz", [True, False])
def test_idx_loader_reads_torchvisions_layout(tmp_path, folder, gz):
    arrays = write_mnist(tmp_path / folder / "raw", gz=gz)
    data = load_idx(tmp_path, folder)
    assert data.train.images.shape == (6, 1, 28, 28) and data.test.images.shape == (4, 1, 28, 28)
    assert_matches(data, arrays)


@pytest.mark.parametrize("gz", [True, False])
def test_idx_loader_finds_files_in_extra_dirs(tmp_path, gz):
    arrays = write_mnist(tmp_path / "elsewhere", gz=gz, seed=1)
    data = load_idx(tmp_path / "empty", "FashionMNIST", extra_dirs=[str(tmp_path / "elsewhere")])
    assert_matches(data, arrays)


def test_idx_loader_mixes_gzipped_and_raw_files(tmp_path):
    arrays = write_mnist(tmp_path / "MNIST" / "raw", gz=True, seed=2)
    raw = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte.gz"
    raw.with_suffix("").write_bytes(gzip.decompress(raw.read_bytes()))
    raw.unlink()
    assert_matches(load_idx(tmp_path), arrays)


def test_idx_loader_missing_files_name_them_and_where_to_put_them(tmp_path):
    write_idx(tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte", np.zeros(4, np.uint8))
    with pytest.raises(DataError) as e:
        load_idx(tmp_path)
    message = str(e.value)
    for name in IDX_NAMES[:3]:
        assert name in message
    assert "t10k-labels" not in message
    assert str(tmp_path / "MNIST" / "raw") in message and "\n" not in message


def test_idx_loader_without_a_downloader_does_not_download(tmp_path):
    with pytest.raises(DataError, match="train-images-idx3-ubyte"):
        load_idx_dataset(
            str(tmp_path), download=True, folder="MNIST", name="mnist", downloader=None
        )


def test_idx_loader_download_uses_the_downloader_then_loads(tmp_path):
    calls = []

    def fake_downloader(root: str, train: bool, download: bool) -> None:
        calls.append((root, train, download))
        if len(calls) == 1:
            write_mnist(Path(root) / "MNIST" / "raw", gz=False, seed=3)

    data = load_idx_dataset(
        str(tmp_path), download=True, folder="MNIST", name="mnist", downloader=fake_downloader
    )
    assert calls == [(str(tmp_path), True, True), (str(tmp_path), False, True)]
    assert len(data.train) == 6


def test_a_failed_download_is_one_data_error_with_the_reason(tmp_path):
    def offline(root: str, train: bool, download: bool) -> None:
        raise OSError("Network is unreachable\nlong traceback text")

    with pytest.raises(DataError, match=r"download into .* failed \(Network is unreachable\)") as e:
        load_idx_dataset(
            str(tmp_path), download=True, folder="MNIST", name="mnist", downloader=offline
        )
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize(
    "keep", [5, 16, 100]
)  # bytes kept: inside the header, the dims, the pixels
def test_truncated_idx_file_is_a_data_error(tmp_path, gz, keep):
    arrays = write_mnist(tmp_path / "MNIST" / "raw", gz=False)
    path = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    raw = path.read_bytes()[:keep]
    assert len(raw) < 16 + arrays["train-images-idx3-ubyte"].size
    if gz:
        path.unlink()
        path = path.with_name(path.name + ".gz")
        raw = gzip.compress(raw)[: max(keep, 20)] if keep < 100 else gzip.compress(raw)
    path.write_bytes(raw)
    with pytest.raises(DataError, match="train-images-idx3-ubyte"):
        load_idx(tmp_path)


def test_idx_file_with_a_bad_magic_number_is_a_data_error(tmp_path):
    write_mnist(tmp_path / "MNIST" / "raw")
    (tmp_path / "MNIST" / "raw" / "train-labels-idx1-ubyte").write_bytes(b"<html>not found</html>")
    with pytest.raises(DataError, match="magic"):
        load_idx(tmp_path)


def test_idx_images_and_labels_of_different_lengths_are_a_data_error(tmp_path):
    write_mnist(tmp_path / "MNIST" / "raw")
    write_idx(tmp_path / "MNIST" / "raw" / "train-labels-idx1-ubyte", np.zeros(5, np.uint8))
    with pytest.raises(DataError, match="do not match"):
        load_idx(tmp_path)


# --------------------------------------------------------------------------- CIFAR
def cifar10(root: Path, download: bool = False, **kwargs: object):
    return load_cifar(
        root=str(root),
        download=download,
        folder="cifar-10-batches-py",
        name="cifar10",
        train_files=CIFAR10_FILES,
        test_files=["test_batch"],
        label_key="labels",
        num_classes=10,
        **kwargs,
    )


def cifar100(root: Path):
    return load_cifar(
        root=str(root),
        download=False,
        folder="cifar-100-python",
        name="cifar100",
        train_files=["train"],
        test_files=["test"],
        label_key="fine_labels",
        num_classes=100,
    )


def test_cifar10_loader_reads_the_python_batches(tmp_path):
    written = write_cifar(tmp_path / "cifar-10-batches-py", [*CIFAR10_FILES, "test_batch"])
    data = cifar10(tmp_path)
    assert data.train.images.shape == (10, 3, 32, 32) and data.test.images.shape == (2, 3, 32, 32)
    assert data.train.images.dtype == torch.uint8 and data.train.labels.dtype == torch.int64
    train_data = np.concatenate([written[f][0] for f in CIFAR10_FILES])
    train_labels = [y for f in CIFAR10_FILES for y in written[f][1]]
    assert (
        data.train.labels.tolist() == train_labels
        and data.test.labels.tolist() == written["test_batch"][1]
    )
    # Row layout: 1024 red, 1024 green, 1024 blue values, each 32x32 row-major.
    i, c, y, x = 7, 2, 5, 30
    assert data.train.images[i, c, y, x].item() == train_data[i, c * 1024 + y * 32 + x]
    assert np.array_equal(data.train.images.numpy().reshape(10, 3072), train_data)
    assert data.num_classes == 10 and data.pretrain is data.train


def test_cifar100_loader_uses_the_fine_labels(tmp_path):
    written = write_cifar(
        tmp_path / "cifar-100-python", ["train", "test"], "fine_labels", 100, per_file=3
    )
    data = cifar100(tmp_path)
    assert data.train.labels.tolist() == written["train"][1]
    assert data.test.labels.tolist() == written["test"][1]
    assert data.num_classes == 100 and data.train.images.shape == (3, 3, 32, 32)


class Payload:
    """Unpickling this would run a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("where", ["data", "top"])
def test_cifar_pickle_with_code_is_refused_and_does_not_run(tmp_path, where):
    write_cifar(tmp_path / "cifar-10-batches-py", [*CIFAR10_FILES, "test_batch"])
    marker = tmp_path / "pwned"
    payload = Payload(marker)
    obj = {b"data": payload, b"labels": [0]} if where == "data" else payload
    with (tmp_path / "cifar-10-batches-py" / "data_batch_3").open("wb") as f:
        pickle.dump(obj, f, protocol=2)
    with pytest.raises(DataError, match="data_batch_3"):
        cifar10(tmp_path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "content",
    [[1, 2, 3], {b"data": "not pixels", b"labels": [0]}, {b"labels": [0]}],
    ids=["list", "string-data", "no-data"],
)
def test_cifar_pickle_of_something_else_is_a_data_error(tmp_path, content):
    write_cifar(tmp_path / "cifar-10-batches-py", [*CIFAR10_FILES, "test_batch"])
    with (tmp_path / "cifar-10-batches-py" / "test_batch").open("wb") as f:
        pickle.dump(content, f, protocol=2)
    with pytest.raises(DataError, match="test_batch"):
        cifar10(tmp_path)


def test_cifar_labels_that_do_not_match_the_images_are_a_data_error(tmp_path):
    write_cifar(tmp_path / "cifar-10-batches-py", [*CIFAR10_FILES, "test_batch"])
    write_cifar_batch(
        tmp_path / "cifar-10-batches-py" / "test_batch", np.zeros((2, 3072), np.uint8), [1, 2, 3]
    )
    with pytest.raises(DataError, match="test_batch"):
        cifar10(tmp_path)


def test_cifar_truncated_file_is_a_data_error(tmp_path):
    write_cifar(tmp_path / "cifar-10-batches-py", [*CIFAR10_FILES, "test_batch"])
    path = tmp_path / "cifar-10-batches-py" / "data_batch_1"
    path.write_bytes(path.read_bytes()[:500])
    with pytest.raises(DataError, match="data_batch_1"):
        cifar10(tmp_path)


def test_cifar_missing_files_are_named(tmp_path):
    write_cifar(tmp_path / "cifar-10-batches-py", ["data_batch_1", "data_batch_2"])
    with pytest.raises(DataError) as e:
        cifar10(tmp_path)
    message = str(e.value)
    for name in ["data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]:
        assert name in message
    assert "data_batch_1" not in message and "data_batch_2" not in message
    assert str(tmp_path / "cifar-10-batches-py") in message and "\n" not in message


def test_cifar_without_a_downloader_does_not_download(tmp_path):
    with pytest.raises(DataError, match="test_batch"):
        cifar10(tmp_path, download=True, downloader=None)


def test_built_in_datasets_name_their_classes(tmp_path):
    """Plots, the projector and embeddings files show Fashion-MNIST's clothes, not 0-9."""
    from contrastive_cli.data.sources import CLASS_NAMES, load_digits

    assert load_digits().class_names == [str(i) for i in range(10)]
    write_mnist(tmp_path / "FashionMNIST" / "raw")
    data = load_idx_dataset(
        root=str(tmp_path), download=False, folder="FashionMNIST", name="fashion_mnist"
    )
    assert data.class_names == CLASS_NAMES["fashion_mnist"] and data.class_names[9] == "Ankle boot"
    assert all(len(names) == 10 for names in CLASS_NAMES.values())

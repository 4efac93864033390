"""Loaders for the built-in datasets, in their original file formats.

MNIST-family files are IDX (optionally gzipped), CIFAR files are the python-version
pickled batches; downloads use torchvision's dataset classes, which put the files where
these loaders look. Which folder and files each dataset uses is set in ``conf/data``.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import pickle
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch
from annotated_types import Ge

from contrastive_cli.data.datasets import ImageData, Split, stratified_test_mask
from contrastive_cli.errors import ConfigError, DataError
from contrastive_cli.schema import Count, Fraction, NonEmpty, Text

# Class names of the built-in datasets, for plots, the projector and embeddings files
# (CIFAR-100's come from its archive's meta file).
CLASS_NAMES: dict[str, list[str]] = {
    "digits": [str(i) for i in range(10)],
    "mnist": [str(i) for i in range(10)],
    "fashion_mnist": [
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
        "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
    ],
    "cifar10": [
        "airplane", "automobile", "bird", "cat", "deer",
        "dog", "frog", "horse", "ship", "truck",
    ],
    "stl10": [
        "airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck",
    ],
}  # fmt: skip


def load_digits(test_fraction: Fraction = 0.2, split_seed: Count = 0) -> ImageData:
    """scikit-learn's 8x8 digits (1,797 images, ships with the package; no download).

    The data has no official split; a stratified ``test_fraction`` is held out with a fixed
    ``split_seed`` (not the run seed), so every run evaluates on the same images.
    """
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    images = torch.from_numpy(np.rint(bunch.images * (255 / 16)).astype(np.uint8)).unsqueeze(1)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    is_test = torch.from_numpy(stratified_test_mask(bunch.target, test_fraction, split_seed))
    train = Split(images[~is_test], labels[~is_test])
    return ImageData(
        pretrain=train,
        train=train,
        test=Split(images[is_test], labels[is_test]),
        num_classes=10,
        class_names=CLASS_NAMES["digits"],
    )


# --------------------------------------------------------------------------- MNIST family
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (uint8 payload), gzipped or not."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as e:  # truncated or corrupt download
            raise DataError(
                f"{path}: damaged gzip file ({e}); delete it and fetch it again"
            ) from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path}: not an uint8 IDX file (bad magic number)")
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise DataError(f"{path}: truncated IDX file (the header is cut off)")
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    payload = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if payload.size != int(np.prod(dims)):
        raise DataError(f"{path}: truncated IDX file ({payload.size} values, header says {dims})")
    return payload.reshape(dims)


def _find(name: str, dirs: Sequence[Path]) -> Path | None:
    for d in dirs:
        for candidate in (d / name, d / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def load_idx_dataset(
    root: Text,
    download: bool,
    folder: Text,
    name: Text,
    downloader: Callable[..., object] | None = None,
    extra_dirs: Sequence[Text] = (),
    url: str = "",
) -> ImageData:
    """MNIST or Fashion-MNIST from ``root/<folder>/raw`` (torchvision's layout),
    ``root/<folder>``, ``root`` or ``extra_dirs``; downloaded into root when allowed."""
    base = Path(root).expanduser()
    dirs = [base / folder / "raw", base / folder, base, *(Path(d) for d in extra_dirs)]
    wanted = [f for pair in IDX_FILES.values() for f in pair]
    found = {f: _find(f, dirs) for f in wanted}
    missing = [f for f, p in found.items() if p is None]

    def by_hand(files: list[str]) -> str:
        return (
            f"put {', '.join(f + '[.gz]' for f in files)} in {base / folder / 'raw'} "
            f"(from {url or 'the dataset site'})"
        )

    if missing and download and downloader is not None:
        _download(name, downloader, base, by_hand(missing))
        found = {f: _find(f, dirs) for f in wanted}
        missing = [f for f, p in found.items() if p is None]
    if missing:
        raise _missing(name, ", ".join(f + "[.gz]" for f in missing), by_hand(missing), download)
    splits = {}
    for split, (images_file, labels_file) in IDX_FILES.items():
        images = read_idx(found[images_file])  # type: ignore[arg-type]
        labels = read_idx(found[labels_file])  # type: ignore[arg-type]
        if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
            raise DataError(
                f"data={name}: {found[images_file]} and {found[labels_file]} do not match"
            )
        splits[split] = Split(
            torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))
        )
    return ImageData(
        pretrain=splits["train"],
        train=splits["train"],
        test=splits["test"],
        num_classes=10,
        class_names=CLASS_NAMES.get(name),
    )


# --------------------------------------------------------------------------- CIFAR
class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR batch files and nothing else: numpy arrays and plain types."""

    ALLOWED = frozenset(
        {
            ("numpy.core.multiarray", "_reconstruct"),
            ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"),
            ("numpy", "dtype"),
            ("numpy.core.multiarray", "scalar"),
            ("numpy._core.multiarray", "scalar"),
            ("_codecs", "encode"),
        }
    )

    def find_class(self, module: str, name: str) -> type:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        batch = _ArrayUnpickler(io.BytesIO(path.read_bytes()), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        raise DataError(f"{path}: not a CIFAR python batch file ({e})") from None
    if not isinstance(batch, dict):
        kind = type(batch).__name__
        raise DataError(f"{path}: not a CIFAR python batch file (holds a {kind}, not a dict)")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or label_key not in batch:
        raise DataError(f"{path}: CIFAR batch without 'data' or '{label_key}'")
    try:
        data = np.asarray(batch["data"], dtype=np.uint8)
        labels = np.asarray(batch[label_key], dtype=np.int64)
    except (TypeError, ValueError) as e:
        raise DataError(f"{path}: CIFAR batch with unreadable data or labels ({e})") from None
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: CIFAR data must be (N, 3072) uint8, got {data.shape}")
    if labels.shape != (data.shape[0],):
        raise DataError(f"{path}: {labels.size} labels for {data.shape[0]} images")
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar(
    root: Text,
    download: bool,
    folder: Text,
    name: Text,
    train_files: Annotated[Sequence[Text], NonEmpty],
    test_files: Annotated[Sequence[Text], NonEmpty],
    label_key: Text,
    num_classes: Annotated[int, Ge(2)],
    downloader: Callable[..., object] | None = None,
    url: str = "",
) -> ImageData:
    """CIFAR-10/100 from ``root/<folder>`` (the extracted python-version archive)."""
    base = Path(root).expanduser()
    directory = base / folder
    files = [*train_files, *test_files]
    by_hand = f"extract the python version archive ({url or 'from the dataset site'}) into {base}"
    if not all((directory / f).is_file() for f in files) and download and downloader is not None:
        _download(name, downloader, base, by_hand)
    missing = [f for f in files if not (directory / f).is_file()]
    if missing:
        raise _missing(name, f"{', '.join(missing)} in {directory}", by_hand, download)

    def read(names: Sequence[str]) -> Split:
        parts = [_read_cifar_batch(directory / f, label_key) for f in names]
        images = torch.from_numpy(np.concatenate([p[0] for p in parts]))
        return Split(images, torch.from_numpy(np.concatenate([p[1] for p in parts])))

    train = read(train_files)
    names = CLASS_NAMES.get(name) or _cifar_class_names(directory, num_classes)
    return ImageData(
        pretrain=train,
        train=train,
        test=read(test_files),
        num_classes=num_classes,
        class_names=names,
    )


def _cifar_class_names(directory: Path, num_classes: int) -> list[str] | None:
    """CIFAR-100's fine label names from the archive's ``meta`` file, if it is there."""
    path = directory / "meta"
    if not path.is_file():
        return None
    try:
        with path.open("rb") as f:
            meta = _ArrayUnpickler(f, encoding="latin1").load()
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in meta["fine_label_names"]]
    except Exception:  # a damaged or foreign meta file: numbers instead of names
        return None
    return names if len(names) == num_classes else None


def _missing(name: str, files: str, by_hand: str, download: bool) -> DataError:
    """The one line for data files that are not there: which, and how to get them."""
    return DataError(
        f"data={name}: missing {files}; {by_hand}"
        + ("" if download else " or set data.download=true")
    )


def _download(
    name: str,
    downloader: Callable[..., object],
    root: Path,
    offline: str,
    calls: Sequence[dict[str, object]] = ({"train": True}, {"train": False}),
) -> None:
    """Fetch with torchvision's code, once per ``calls`` entry (its split arguments); any
    failure (offline, disk) becomes one line that ends with ``offline``: which files to put
    where by hand, and leaves no empty folder behind (torchvision makes ``<root>/MNIST/raw``
    before it downloads)."""
    existed = _folders(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
        for split in calls:
            downloader(root=str(root), download=True, **split)
    except Exception as e:  # network errors come in many types (URLError, OSError, RuntimeError)
        _remove_empty_new_folders(root, existed)
        reason = str(e).strip().splitlines()[0].rstrip(":") if str(e).strip() else ""
        raise DataError(
            f"data={name}: download into {root} failed ({reason or type(e).__name__}); "
            f"without internet, {offline}"
        ) from None


def _folders(root: Path) -> set[Path]:
    """``root``'s existing ancestors, itself and every folder under it."""
    found = {p for p in (root, *root.parents) if p.is_dir()}
    if root.is_dir():
        found |= {p for p in root.rglob("*") if p.is_dir() and not p.is_symlink()}
    return found


def _remove_empty_new_folders(root: Path, existed: set[Path]) -> None:
    """Remove the folders a failed download made that are still empty, deepest first."""
    made = [p for p in _folders(root) if p not in existed]
    for folder in sorted(made, key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):  # not empty (a partial file): kept, it is named
            folder.rmdir()


# --------------------------------------------------------------------------- STL-10
STL10_SIZE = 96
STL10_FILES = {
    "unlabeled": ("unlabeled_X.bin", None),
    "train": ("train_X.bin", "train_y.bin"),
    "test": ("test_X.bin", "test_y.bin"),
}


def _read_stl10_images(path: Path) -> torch.Tensor:
    """(N, 3, 96, 96) uint8, memory-mapped: the file stores each image channel by channel,
    column-major (as torchvision reads it), so rows and columns are swapped in a view."""
    per_image = 3 * STL10_SIZE * STL10_SIZE
    size = path.stat().st_size
    if size == 0 or size % per_image:
        raise DataError(f"{path}: {size} bytes is not a whole number of 3x96x96 STL-10 images")
    array = np.memmap(path, dtype=np.uint8, mode="c").reshape(-1, 3, STL10_SIZE, STL10_SIZE)
    return torch.from_numpy(array.transpose(0, 1, 3, 2))


def load_stl10(
    root: Text,
    download: bool,
    name: Text,
    folder: Text = "stl10_binary",
    pretrain_split: Literal["unlabeled", "train", "train+unlabeled"] = "unlabeled",
    downloader: Callable[..., object] | None = None,
    url: str = "",
) -> ImageData:
    """STL-10 from ``root/<folder>`` (torchvision's layout); trains on ``pretrain_split``."""
    allowed = ("unlabeled", "train", "train+unlabeled")
    if pretrain_split not in allowed:
        raise ConfigError(
            f"data.pretrain_split={pretrain_split!r} is not allowed; allowed: {', '.join(allowed)}"
        )
    base = Path(root).expanduser()
    directory = base / folder
    files = [f for pair in STL10_FILES.values() for f in pair if f is not None]
    by_hand = f"extract stl10_binary.tar.gz ({url or 'from the dataset site'}) into {base}"
    if not all((directory / f).is_file() for f in files) and download and downloader is not None:
        # One call fetches and extracts the whole archive.
        _download(name, downloader, base, by_hand, calls=({"split": "train"},))
    missing = [f for f in files if not (directory / f).is_file()]
    if missing:
        raise _missing(name, f"{', '.join(missing)} in {directory}", by_hand, download)
    splits = {}
    for split, (images_file, labels_file) in STL10_FILES.items():
        images = _read_stl10_images(directory / images_file)
        labels = None
        if labels_file is not None:
            raw = np.fromfile(directory / labels_file, dtype=np.uint8)
            if raw.shape[0] != images.shape[0] or raw.size == 0 or raw.min() < 1 or raw.max() > 10:
                raise DataError(
                    f"data={name}: {directory / labels_file} does not hold labels 1-10 for "
                    f"the {images.shape[0]} images of {images_file}"
                )
            labels = torch.from_numpy(raw.astype(np.int64) - 1)
        splits[split] = Split(images, labels)
    parts = [splits[p] for p in pretrain_split.split("+")]
    pretrain = parts[0] if len(parts) == 1 else Split(torch.cat([p.images for p in parts]))
    return ImageData(
        pretrain=pretrain,
        train=splits["train"],
        test=splits["test"],
        num_classes=10,
        class_names=CLASS_NAMES["stl10"],
    )

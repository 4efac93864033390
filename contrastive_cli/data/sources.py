"""Loaders for the built-in datasets, in their original file formats.

MNIST-family files are IDX (optionally gzipped), CIFAR files are the python-version
pickled batches; downloads use torchvision's dataset classes, which put the files where
these loaders look. Which folder and files each dataset uses is set in ``conf/data``.
"""

from __future__ import annotations

import gzip
import io
import pickle
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from contrastive_cli.data.datasets import ImageData, Split
from contrastive_cli.errors import DataError


def load_digits(test_fraction: float = 0.2, split_seed: int = 0) -> ImageData:
    """scikit-learn's 8x8 digits (1,797 images, ships with the package; no download).

    The data has no official split; a stratified ``test_fraction`` is held out with a fixed
    ``split_seed`` (not the run seed), so every run evaluates on the same images.
    """
    from sklearn.datasets import load_digits as sk_digits

    bunch = sk_digits()
    images = torch.from_numpy(np.rint(bunch.images * (255 / 16)).astype(np.uint8)).unsqueeze(1)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    rng = np.random.default_rng(split_seed)
    test_idx = []
    for c in range(10):
        members = np.flatnonzero(bunch.target == c)
        test_idx.extend(rng.permutation(members)[: round(len(members) * test_fraction)])
    is_test = torch.zeros(len(labels), dtype=torch.bool)
    is_test[torch.as_tensor(sorted(test_idx))] = True
    train = Split(images[~is_test], labels[~is_test])
    return ImageData(pretrain=train, train=train, test=Split(images[is_test], labels[is_test]), num_classes=10)


# --------------------------------------------------------------------------- MNIST family
IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (uint8 payload), gzipped or not."""
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path}: not an uint8 IDX file (bad magic number)")
    ndim = raw[3]
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
    root: str,
    download: bool,
    folder: str,
    name: str,
    downloader: Callable[..., object] | None = None,
    extra_dirs: Sequence[str] = (),
    url: str = "",
) -> ImageData:
    """MNIST or Fashion-MNIST from ``root/<folder>/raw`` (torchvision's layout),
    ``root/<folder>``, ``root`` or ``extra_dirs``; downloaded into root when allowed."""
    base = Path(root).expanduser()
    dirs = [base / folder / "raw", base / folder, base, *(Path(d) for d in extra_dirs)]
    wanted = [f for pair in IDX_FILES.values() for f in pair]
    found = {f: _find(f, dirs) for f in wanted}
    if None in found.values() and download and downloader is not None:
        _download(name, downloader, base)
        found = {f: _find(f, dirs) for f in wanted}
    missing = [f for f, p in found.items() if p is None]
    if missing:
        raise DataError(
            f"data={name}: missing {', '.join(f + '[.gz]' for f in missing)}; put them in "
            f"{base / folder / 'raw'} (from {url or 'the dataset site'})"
            + ("" if download else " or set data.download=true")
        )
    splits = {}
    for split, (images_file, labels_file) in IDX_FILES.items():
        images = read_idx(found[images_file])  # type: ignore[arg-type]
        labels = read_idx(found[labels_file])  # type: ignore[arg-type]
        if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
            raise DataError(f"data={name}: {found[images_file]} and {found[labels_file]} do not match")
        splits[split] = Split(
            torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))
        )
    return ImageData(pretrain=splits["train"], train=splits["train"], test=splits["test"], num_classes=10)


# --------------------------------------------------------------------------- CIFAR
class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR batch files and nothing else: numpy arrays and plain types."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):  # noqa: ANN201
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        batch = _ArrayUnpickler(io.BytesIO(path.read_bytes()), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError) as e:
        raise DataError(f"{path}: not a CIFAR python batch file ({e})") from None
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or label_key not in batch:
        raise DataError(f"{path}: CIFAR batch without 'data' or '{label_key}'")
    data = np.asarray(batch["data"], dtype=np.uint8)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"{path}: CIFAR data must be (N, 3072) uint8, got {data.shape}")
    return data.reshape(-1, 3, 32, 32), np.asarray(batch[label_key], dtype=np.int64)


def load_cifar(
    root: str,
    download: bool,
    folder: str,
    name: str,
    train_files: Sequence[str],
    test_files: Sequence[str],
    label_key: str,
    num_classes: int,
    downloader: Callable[..., object] | None = None,
    url: str = "",
) -> ImageData:
    """CIFAR-10/100 from ``root/<folder>`` (the extracted python-version archive)."""
    base = Path(root).expanduser()
    directory = base / folder
    files = [*train_files, *test_files]
    if not all((directory / f).is_file() for f in files) and download and downloader is not None:
        _download(name, downloader, base)
    missing = [f for f in files if not (directory / f).is_file()]
    if missing:
        raise DataError(
            f"data={name}: missing {', '.join(missing)} in {directory}; extract the python "
            f"version archive ({url or 'from the dataset site'}) into {base}"
            + ("" if download else " or set data.download=true")
        )

    def read(names: Sequence[str]) -> Split:
        parts = [_read_cifar_batch(directory / f, label_key) for f in names]
        images = torch.from_numpy(np.concatenate([p[0] for p in parts]))
        return Split(images, torch.from_numpy(np.concatenate([p[1] for p in parts])))

    train = read(train_files)
    return ImageData(pretrain=train, train=train, test=read(test_files), num_classes=num_classes)


def _download(name: str, downloader: Callable[..., object], root: Path) -> None:
    """Fetch with torchvision's code; any failure (offline, disk) becomes one line."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        for train in (True, False):
            downloader(root=str(root), train=train, download=True)
    except Exception as e:  # network errors come in many types (URLError, OSError, RuntimeError)
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"data={name}: download into {root} failed ({reason}); data.download=true needs internet") from None

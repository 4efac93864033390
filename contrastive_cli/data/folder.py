"""data=folder: your own images, found recursively, with or without class subfolders.

Layouts (paths relative to the folder; hidden files and folders are ignored):
- ``<class>/**/<image>``: every image sits in a first-level subfolder, and there are at
  least two: labelled. The evaluation splits are a fixed stratified ``test_fraction``.
- ``train/<class>/**/<image>`` and ``test/<class>/...`` (or ``val/``): labelled, with the
  folder's own split.
- anything else (images directly in the folder, or one subfolder): unlabelled.

Training on labelled data uses its train split (the test images stay unseen, as for
CIFAR). With ``eval_path`` (a labelled folder), every image under ``path`` is trained on
and ``eval_path`` gives the k-NN and probe splits. Unlabelled data without ``eval_path``
trains without evaluation.

Files are streamed through DataLoader workers each epoch. With ``cache=true`` they are
decoded once into a uint8 tensor saved next to the data (``<path>/.contrast-cache/``, or
``cache_dir``) and trained on in memory; the cache is keyed on the file list, sizes, mtimes,
image size and channels, and rebuilt when any of them changes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from contrastive_cli.data.datasets import ImageData, Split, stratified_test_mask
from contrastive_cli.data.files import MAX_PIXELS, MODES, ImageFiles, probe
from contrastive_cli.errors import ConfigError, DataError
from contrastive_cli.schema import Count, Fraction, NonEmpty, PositiveInt, Text
from contrastive_cli.untrusted import printable

log = logging.getLogger(__name__)
CACHE_FORMAT = "contrast-folder-cache-v1"  # bump when decoding changes what a file becomes
SHOW = 3  # unreadable files named in the warning


def load_folder(
    path: Text | None,
    eval_path: Text | None = None,
    image_size: PositiveInt = 64,
    channels: Literal[1, 3] = 3,
    cache: bool = False,
    cache_dir: Text | None = None,
    workers: Count | None = None,
    test_fraction: Fraction = 0.2,
    extensions: Annotated[Sequence[Text], NonEmpty] = (
        "jpg",
        "jpeg",
        "jfif",
        "png",
        "webp",
        "bmp",
        "gif",
        "tif",
        "tiff",
        "ppm",
        "pgm",
        "pbm",
        "pnm",
    ),
    max_pixels: PositiveInt = MAX_PIXELS,
) -> ImageData:
    """The images under ``path`` (and ``eval_path``), as the module docstring describes."""
    _check(image_size, channels, test_fraction, workers)
    if not isinstance(max_pixels, int) or isinstance(max_pixels, bool) or max_pixels < 1:
        raise ConfigError(
            f"data.max_pixels={max_pixels!r} is not allowed; allowed: a positive number of pixels"
        )
    if path is None:
        raise ConfigError("data.path is not set: data=folder needs data.path=<folder of images>")
    read = dict(
        image_size=image_size,
        channels=channels,
        cache=cache,
        cache_dir=cache_dir,
        workers=workers,
        extensions=extensions,
        max_pixels=max_pixels,
    )
    found = _read("data.path", path, **read)
    if eval_path is not None:
        evaluation = _read("data.eval_path", eval_path, **read)
        names, train, test = _labelled_splits(evaluation, test_fraction)
        if not names:
            raise ConfigError(
                f"data.eval_path={eval_path} has no class subfolders; it must hold "
                "<class>/<images> (at least two classes) for k-NN and the linear probe"
            )
        log.info(
            f"data.path={path}: {len(found.split)} images, all trained on; data.eval_path={eval_path}: "
            f"{len(names)} classes, {len(train)} train / {len(test)} test images for k-NN and the probe"
        )
        return ImageData(found.split, train, test, len(names), names)
    names, train, test = _labelled_splits(found, test_fraction)
    if not names:
        log.info(
            f"data.path={path}: {len(found.split)} images without class subfolders (unlabelled): no "
            "k-NN or linear probe unless data.eval_path=<folder with class subfolders> is given"
        )
        return ImageData(found.split, None, None, 0)
    log.info(
        f"data.path={path}: {len(names)} classes, {len(train)} train / {len(test)} test images "
        "(the test images are held out of training)"
    )
    return ImageData(train, train, test, len(names), names)


def _check(image_size: object, channels: object, test_fraction: object, workers: object) -> None:
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 1:
        raise ConfigError(
            f"data.image_size={image_size!r} is not allowed; allowed: a positive number of pixels"
        )
    if channels not in MODES:
        raise ConfigError(
            f"data.channels={channels!r} is not allowed; allowed: 1 (greyscale) or 3 (RGB)"
        )
    if not isinstance(test_fraction, int | float) or not 0 < test_fraction < 1:
        raise ConfigError(
            f"data.test_fraction={test_fraction!r} is not allowed; allowed: between 0 and 1"
        )
    if workers is not None and (not isinstance(workers, int) or workers < 0):
        raise ConfigError(
            f"data.workers={workers!r} is not allowed; allowed: null (automatic) or an integer >= 0"
        )


# --------------------------------------------------------------------------- reading a folder
@dataclass(frozen=True)
class _Found:
    root: Path
    rels: list[str]  # readable images, relative to root, sorted
    split: Split  # all of them (unlabelled), in that order


def _read(
    setting: str,
    path: str,
    image_size: int,
    channels: int,
    cache: bool,
    cache_dir: str | None,
    workers: int | None,
    extensions: Sequence[str],
    max_pixels: int,
) -> _Found:
    root = Path(path).expanduser().absolute()
    if not root.exists():
        raise DataError(f"{setting}={path}: no such folder")
    if not root.is_dir():
        raise DataError(f"{setting}={path}: not a folder")
    files = scan(root, extensions)
    if not files:
        raise DataError(
            f"{setting}={path}: no images found (looked recursively for "
            f"{', '.join('.' + e for e in extensions)})"
        )
    all_rels = [rel for rel, _, _ in files]
    images: Tensor | ImageFiles | None = None
    if cache:
        images, rels, skipped = _cached(
            setting, root, files, image_size, channels, cache_dir, workers, max_pixels
        )
    if images is None:  # streamed: drop what PIL cannot even open now, decode per epoch
        skipped = [
            (rel, why)
            for rel in all_rels
            if (why := probe(str(root / rel), max_pixels)) is not None
        ]
        bad = {rel for rel, _ in skipped}
        rels = [rel for rel in all_rels if rel not in bad]
        images = ImageFiles(
            [str(root / rel) for rel in rels], image_size, channels, workers, max_pixels
        )
    if skipped:
        named = printable(", ".join(f"{rel} ({why})" for rel, why in skipped[:SHOW]))
        log.warning(
            f"{setting}={path}: skipped {len(skipped)} of {len(files)} files that are not readable "
            f"images: {named}" + (", ..." if len(skipped) > SHOW else "")
        )
    if not rels:
        raise DataError(f"{setting}={path}: none of the {len(files)} image files can be read")
    return _Found(root, rels, Split(images, None, [str(root / rel) for rel in rels]))


def scan(root: Path, extensions: Sequence[str]) -> list[tuple[str, int, int]]:
    """Image files under ``root``: sorted (relative posix path, size, mtime in ns).

    Symbolic links are followed, but each real folder is entered once (a link back to a
    parent cannot loop) and each real file counted once, under the first of its paths in
    sorted order, so no image is trained on twice or lands in both train and test. Only
    regular files count: a FIFO, socket or device named ``*.png`` is not an image.
    """
    wanted = {e.lower().lstrip(".") for e in extensions}
    seen_dirs: set[tuple[int, int]] = set()
    found = []
    for directory, dirs, names in os.walk(root, followlinks=True):
        try:
            st = os.stat(directory)
        except OSError:
            dirs[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen_dirs:  # reached again through a link
            dirs[:] = []
            continue
        seen_dirs.add((st.st_dev, st.st_ino))
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in names:
            if name.startswith(".") or name.rsplit(".", 1)[-1].lower() not in wanted:
                continue
            full = Path(directory) / name
            try:
                st = full.stat()
            except OSError:  # a dangling link, or a loop of links: not an image
                continue
            if not stat.S_ISREG(st.st_mode):  # a FIFO would block the scan, a device never end
                continue
            rel = full.relative_to(root).as_posix()
            found.append((rel, st.st_size, st.st_mtime_ns, (st.st_dev, st.st_ino)))
    files, seen_files = [], set()
    for rel, size, mtime, inode in sorted(found):
        if inode not in seen_files:
            seen_files.add(inode)
            files.append((rel, size, mtime))
    return files


# --------------------------------------------------------------------------- labels and splits
def _labelled_splits(
    found: _Found, test_fraction: float
) -> tuple[list[str], Split | None, Split | None]:
    """(class names, train, test) from the layout; ([], None, None) when unlabelled."""
    parts = [rel.split("/") for rel in found.rels]
    top = {p[0] for p in parts if len(p) > 1}
    if any(len(p) == 1 for p in parts) or len(top) < 2:
        return [], None, None
    split_layout = (
        top <= {"train", "val", "test"} and "train" in top and all(len(p) >= 3 for p in parts)
    )
    if split_layout:
        test_dir = "test" if "test" in top else "val"
        names = sorted({p[1] for p in parts if p[0] == "train"})
        if len(names) < 2:
            return [], None, None
        if "val" in top and test_dir == "test":
            log.info(f"{found.root}: val/ is not used (test/ is the test split)")
        unknown = sorted({p[1] for p in parts if p[0] == test_dir} - set(names))
        if unknown:
            raise DataError(
                f"{found.root}: {test_dir}/{unknown[0]} is a class that train/ does not have"
            )
        index = {name: i for i, name in enumerate(names)}
        keep = np.array([p[0] in ("train", test_dir) for p in parts])
        is_test = np.array([p[0] == test_dir for p in parts])
        labels = np.array([index.get(p[1], -1) for p in parts], dtype=np.int64)
    else:
        names = sorted(top)
        index = {name: i for i, name in enumerate(names)}
        labels = np.array([index[p[0]] for p in parts], dtype=np.int64)
        keep = np.ones(len(parts), dtype=bool)
        is_test = stratified_test_mask(labels, test_fraction)
    if not is_test.any() or is_test.all():
        raise DataError(
            f"{found.root}: too few images per class for a train/test split "
            f"(data.test_fraction={test_fraction})"
        )
    labelled = Split(found.split.images, torch.from_numpy(labels), found.split.paths)
    train = labelled.subset(torch.from_numpy(np.flatnonzero(keep & ~is_test)))
    test = labelled.subset(torch.from_numpy(np.flatnonzero(keep & is_test)))
    return names, train, test


# --------------------------------------------------------------------------- the cache
def _cached(
    setting: str,
    root: Path,
    files: list[tuple[str, int, int]],
    image_size: int,
    channels: int,
    cache_dir: str | None,
    workers: int | None,
    max_pixels: int,
) -> tuple[Tensor | None, list[str], list[tuple[str, str]]]:
    """(images, their paths, skipped) from the cache file, decoding and writing it when
    stale or missing; (None, [], []) when the decoded images would not fit in memory."""
    needed = len(files) * channels * image_size * image_size
    memory = _physical_memory()
    if memory is not None and needed > memory // 2:
        log.warning(
            f"data.cache=true: {setting}'s images would take {needed / 2**30:.1f} GiB decoded, more "
            f"than half of this machine's {memory / 2**30:.1f} GiB; streaming them instead"
        )
        return None, [], []
    key = hashlib.sha256(
        json.dumps([CACHE_FORMAT, image_size, channels, max_pixels, files]).encode()
    ).hexdigest()
    file = cache_file(root, image_size, channels, cache_dir)
    hit = _read_cache(file, key)
    if hit is not None:
        log.info(f"{setting}: {len(hit[1])} images from the cache {file}")
        return hit
    rels = [rel for rel, _, _ in files]
    decoded, kept, failed = ImageFiles(
        [str(root / r) for r in rels], image_size, channels, workers, max_pixels
    ).decode_all(f"decoding {root.name} for the cache")
    kept_rels = [rels[i] for i in kept]
    skipped = [(rels[i], why) for i, why in failed]
    metadata = {
        "format": CACHE_FORMAT,
        "key": key,
        "paths": json.dumps(kept_rels),
        "skipped": json.dumps(skipped),
    }
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
        save_file({"images": decoded.contiguous()}, str(tmp), metadata=metadata)
        os.chmod(tmp, 0o644)  # readable by whoever can read the data (the writer makes it 0600)
        os.replace(tmp, file)
        log.info(f"{setting}: cached {len(kept)} decoded images in {file}")
    except OSError as e:
        log.warning(
            f"data.cache=true: cannot write {file} ({e.strerror or e}); keeping the images in memory "
            "for this run only (data.cache_dir=<writable folder> keeps them)"
        )
    return decoded, kept_rels, skipped


def cache_file(root: Path, image_size: int, channels: int, cache_dir: str | None) -> Path:
    """Where the cache of ``root`` lives: inside it, or in ``cache_dir`` under a name unique to it."""
    name = f"{image_size}px-{channels}ch.safetensors"
    if cache_dir is None:
        return root / ".contrast-cache" / name
    tag = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:10]
    return Path(cache_dir).expanduser() / f"{root.resolve().name}-{tag}-{name}"


def _read_cache(file: Path, key: str) -> tuple[Tensor, list[str], list[tuple[str, str]]] | None:
    """The cached (images, paths, skipped) when ``file`` holds ``key``; None when missing or stale."""
    from contrastive_cli.untrusted import Missing, UntrustedFile, open_regular

    try:  # a regular file only (a FIFO named like the cache would block), read through its fd
        fd = open_regular(file, follow=True)
    except Missing:
        return None
    except UntrustedFile as e:
        log.warning(f"cannot read the cache ({e}): rebuilding it")
        return None
    try:
        proc = f"/proc/self/fd/{fd}"
        with safe_open(proc if os.path.exists(proc) else str(file), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != CACHE_FORMAT or meta.get("key") != key:
                log.info(
                    f"the cache {file} is stale (the files or settings changed): rebuilding it"
                )
                return None
            return (
                f.get_tensor("images"),
                json.loads(meta["paths"]),
                [tuple(s) for s in json.loads(meta["skipped"])],
            )
    except Exception as e:  # a torn or foreign file: rebuild it
        log.warning(f"cannot read the cache {file} ({type(e).__name__}): rebuilding it")
        return None
    finally:
        os.close(fd)


def _physical_memory() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # not on this platform
        return None

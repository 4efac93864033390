"""Image files decoded on demand: the data path for folders of images.

DataLoader workers only decode, convert and resize to uint8 (C, S, S) tensors; augmentation
runs later on whole batches on the device, exactly as for in-memory data. The main process
never sees PIL objects, and a file that fails to decode is reported, not fatal.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from contrastive_cli.errors import DataError
from contrastive_cli.progress import Task
from contrastive_cli.untrusted import printable

log = logging.getLogger(__name__)

MODES = {1: "L", 3: "RGB"}
# PIL's own decompression-bomb warning threshold (~89 megapixels, 0.25 GiB as RGB): a larger
# image is skipped by default, so a small file that declares a huge image cannot stall
# every epoch (data.max_pixels raises or lowers the cap).
MAX_PIXELS = 89_478_485
_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def default_workers() -> int:
    """One decode worker per CPU core beyond the first (the training loop's), at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    return max(1, min(8, cores - 1))


class TooLarge(ValueError):
    """An image whose header declares more pixels than the cap."""


@contextlib.contextmanager
def _open(path: str) -> Iterator[Image.Image]:
    """``Image.open`` with PIL's own decompression-bomb check off: ``max_pixels`` is the cap,
    checked on the header before anything is decoded, with a message naming the setting."""
    from contrastive_cli.untrusted import open_regular

    # A file swapped for a FIFO or device after the scan must not block a worker forever.
    with open(path, "rb", opener=lambda p, _: open_regular(p, follow=True)) as f:
        previous = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            with Image.open(f) as img:
                yield img
        finally:
            Image.MAX_IMAGE_PIXELS = previous


def _check_pixels(img: Image.Image, max_pixels: int) -> None:
    w, h = img.size
    if w * h > max_pixels:
        raise TooLarge(
            f"declares {w}x{h} = {w * h:,} pixels, more than data.max_pixels={max_pixels:,}"
        )


def decode(path: str, image_size: int, channels: int, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """One image file -> (channels, image_size, image_size) uint8.

    EXIF rotation is applied; transparency is composited onto white; 16-bit greyscale is
    scaled (not clipped) to 8 bits; the shorter side is resized to ``image_size`` and the
    centre cropped, so the aspect ratio is kept. JPEGs are decoded at a reduced scale when
    they are much larger than needed (PIL's draft mode), which is several times faster.
    """
    mode = MODES[channels]
    with _open(path) as img:
        _check_pixels(img, max_pixels)
        img.draft(mode, (image_size, image_size))
        if (
            img.getexif().get(ExifTags.Base.Orientation, 1) != 1
        ):  # exif_transpose copies even when upright
            img = ImageOps.exif_transpose(img)
        img = _convert(img, mode)
        if img.size != (image_size, image_size):
            img = ImageOps.fit(img, (image_size, image_size), method=Image.Resampling.BILINEAR)
        array = np.asarray(img, dtype=np.uint8)
    return np.array(
        array[None] if channels == 1 else array.transpose(2, 0, 1), order="C"
    )  # a writable copy


def _convert(img: Image.Image, mode: str) -> Image.Image:
    if img.mode in _SIXTEEN_BIT:
        scaled = np.asarray(img, dtype=np.float32) / 257.0
        img = Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    return img if img.mode == mode else img.convert(mode)


def probe(path: str, max_pixels: int = MAX_PIXELS) -> str | None:
    """None when PIL recognises the file as an image of at most ``max_pixels`` (header
    only), else the reason."""
    try:
        with _open(path) as img:
            _check_pixels(img, max_pixels)
        return None
    except TooLarge as e:
        return str(e)
    except Exception as e:  # PIL raises many types for bad files (OSError, SyntaxError, ...)
        return _reason(e)


def _reason(e: Exception) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else ""
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


class _Decoder(Dataset):
    """What the workers run: index -> (uint8 image, decoded ok, reason if not)."""

    def __init__(self, paths: Sequence[str], image_size: int, channels: int, max_pixels: int):
        self.paths, self.image_size, self.channels = paths, image_size, channels
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[Tensor, bool, str]:
        try:
            image = decode(self.paths[i], self.image_size, self.channels, self.max_pixels)
            return torch.from_numpy(image), True, ""
        except Exception as e:  # reported by the main process
            return (
                torch.zeros(self.channels, self.image_size, self.image_size, dtype=torch.uint8),
                False,
                _reason(e),
            )


def _leave_signals_to_the_main_process(worker_id: int) -> None:
    """A decode worker ignores SIGINT/SIGTERM: a signal to the process group (Ctrl-C, kill
    of a job) is the main process's to handle (``contrastive_cli.signals``). Left to the
    workers, they died with a traceback each, and the main process then failed with
    "DataLoader worker exited unexpectedly" instead of stopping cleanly. The workers still
    end with the main process: DataLoader shuts them down, or they notice it is gone."""
    import signal

    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, signal.SIG_IGN)


class ImageFiles:
    """A list of image files that behaves like a lazy (N, C, S, S) uint8 tensor.

    ``files[idx]`` is a subset (still lazy), ``split(batch_size)`` yields decoded batches in
    order, like ``Tensor.split``; so evaluation code written for tensors streams files too.
    """

    def __init__(
        self,
        paths: Sequence[str],
        image_size: int,
        channels: int,
        workers: int | None = None,
        max_pixels: int = MAX_PIXELS,
    ):
        self.paths = list(paths)
        self.image_size = image_size
        self.channels = channels
        self.max_pixels = max_pixels
        self.workers = default_workers() if workers is None else workers
        self._warned: set[str] = set()

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.paths), self.channels, self.image_size, self.image_size)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, idx: Tensor | Sequence[int] | slice) -> ImageFiles:
        if isinstance(idx, slice):
            paths = self.paths[idx]
        else:
            paths = [self.paths[i] for i in torch.as_tensor(idx).tolist()]
        return ImageFiles(paths, self.image_size, self.channels, self.workers, self.max_pixels)

    def split(self, batch_size: int) -> Iterator[Tensor]:
        """Consecutive batches of ``batch_size`` (the last one shorter), decoded."""
        starts = range(0, len(self), batch_size)
        return self.batches([list(range(s, min(s + batch_size, len(self)))) for s in starts])

    def batches(
        self, index_batches: Sequence[list[int]], pin_memory: bool = False
    ) -> Iterator[Tensor]:
        """The given batches of indices, decoded by the workers, in order.

        A file that passed the header check but fails to decode (truncated data) is
        replaced by the next readable file in the list, so batch sizes stay constant; each
        such file is named once in a warning.
        """
        for idx, (images, ok, reasons) in zip(
            index_batches, self._decoded(index_batches, pin_memory), strict=True
        ):
            for j in (~ok).nonzero().flatten().tolist():
                images[j] = self._substitute(idx[j], reasons[j])
            yield images

    def decode_all(self, desc: str) -> tuple[Tensor, list[int], list[tuple[int, str]]]:
        """Every file at once: (readable images (M, C, S, S), their indices, [(index, reason)])."""
        out = torch.empty(self.shape, dtype=torch.uint8)
        kept: list[int] = []
        failed: list[tuple[int, str]] = []
        index_batches = [list(range(s, min(s + 256, len(self)))) for s in range(0, len(self), 256)]
        with Task(desc, total=len(self), unit="image") as bar:
            for idx, (images, ok, reasons) in zip(
                index_batches, self._decoded(index_batches), strict=True
            ):
                for j, i in enumerate(idx):
                    if ok[j]:
                        out[len(kept)] = images[j]
                        kept.append(i)
                    else:
                        failed.append((i, reasons[j]))
                bar.update(len(idx))
        return out[: len(kept)], kept, failed

    def _decoded(
        self, index_batches: Iterable[list[int]], pin_memory: bool = False
    ) -> Iterator[tuple[Tensor, Tensor, list[str]]]:
        loader = DataLoader(
            _Decoder(self.paths, self.image_size, self.channels, self.max_pixels),
            batch_sampler=index_batches,
            num_workers=self.workers,
            pin_memory=pin_memory,
            worker_init_fn=_leave_signals_to_the_main_process,
        )
        try:
            yield from loader
        except RuntimeError as e:  # a worker killed from outside (OOM killer, kill -9)
            if "DataLoader worker" not in str(e):
                raise
            raise DataError(
                f"a process decoding images stopped ({str(e).splitlines()[0][:200]}); "
                "data.workers=0 decodes in the main process"
            ) from None

    def _substitute(self, i: int, reason: str) -> Tensor:
        if self.paths[i] not in self._warned:
            self._warned.add(self.paths[i])
            log.warning(
                f"cannot decode {printable(self.paths[i])} ({printable(reason)}); using the next "
                "readable image in its place"
            )
        for step in range(1, min(len(self), 100)):
            try:
                path = self.paths[(i + step) % len(self)]
                return torch.from_numpy(
                    decode(path, self.image_size, self.channels, self.max_pixels)
                )
            except Exception:  # try the next one
                continue
        raise DataError(f"{self.paths[i]} and the files after it cannot be decoded ({reason})")

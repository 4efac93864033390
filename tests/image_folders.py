"""Tiny folders of generated images for the data=folder and embed tests."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

MODES = ("RGB", "L", "RGBA", "P")


def write_images(
    root: Path,
    classes: Sequence[str] | None = ("circle", "square"),
    per_class: int = 20,
    corrupt: bool = True,
    seed: int = 0,
) -> list[Path]:
    """Images of mixed sizes (12-40 px a side), modes (RGB, L, RGBA, P) and formats (PNG,
    JPEG), under ``root/<class>/`` or, with ``classes=None``, directly in ``root``. Each
    class has its own colour, so even a tiny run can tell them apart. With ``corrupt``, a
    ``broken.png`` that is not an image is added. Returns the readable images' paths."""
    rng = np.random.default_rng(seed)
    written = []
    for c, name in enumerate(classes or [None]):
        folder = root / name if name else root
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            w, h = (int(v) for v in rng.integers(12, 41, size=2))
            pixels = rng.integers(0, 60, size=(h, w, 3), dtype=np.uint8)
            pixels[..., c % 3] += 150
            mode = MODES[i % len(MODES)]
            image = Image.fromarray(pixels).convert(mode)
            suffix = "jpg" if mode in ("RGB", "L") and i % 3 == 0 else "png"
            path = folder / f"img{i:03d}.{suffix}"
            image.save(path)
            written.append(path)
    if corrupt:
        (root / (classes[0] if classes else "") / "broken.png").write_bytes(
            b"this is not a png file"
        )
    return sorted(written)


def truncate(path: Path, keep: int = 60) -> None:
    """Cut a file after ``keep`` bytes: the header still opens, the pixels do not decode."""
    path.write_bytes(path.read_bytes()[:keep])

"""Batched augmentation: one call augments a whole uint8 batch on its own device.

Every sample draws its own parameters (crop box, flip, rotation, colour factors, blur
sigma, ...) from the generator passed in, so the same generator state gives the same
views and no per-sample Python runs. Geometry is a single affine grid +
``grid_sample``; colour operations are broadcasts and one batched 3x3 matrix for hue.
Order: crop/flip/rotate -> colour jitter (brightness, contrast, saturation, hue) ->
grayscale -> blur -> solarize -> normalise.

``views`` gives the two views of a step, plus DINO's multi-crop local views (Caron et al.,
2021) when ``local_crops`` > 0: smaller crops of a smaller part of the image, all K of them
drawn in one batched pass.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Annotated

import torch
import torch.nn.functional as F
from annotated_types import Interval
from torch import Tensor

from contrastive_cli.errors import ConfigError
from contrastive_cli.schema import (
    AreaRange,
    Count,
    NonEmpty,
    NonNegative,
    Positive,
    PositiveInt,
    PositiveRange,
    Probability,
)

# ITU-R 601 luma weights, as torchvision's rgb_to_grayscale.
_LUMA = (0.299, 0.587, 0.114)
# RGB <-> YIQ: a hue shift is a rotation of the (I, Q) plane.
_RGB_TO_YIQ = ((0.299, 0.587, 0.114), (0.596, -0.274, -0.322), (0.211, -0.523, 0.312))
_YIQ_TO_RGB = tuple(
    map(tuple, torch.linalg.inv(torch.tensor(_RGB_TO_YIQ, dtype=torch.float64)).tolist())
)


@functools.lru_cache(maxsize=64)
def _constant(values: tuple, device: torch.device, dtype: torch.dtype) -> Tensor:
    """A small constant on ``device``, made once: a fresh host-to-device copy on every batch
    would make the host wait for the CUDA stream (a sync per augmented view)."""
    return torch.tensor(values, device=device, dtype=dtype)


class Augment:
    """The augmentation recipe of a dataset (its ``data.augment`` config).

    Args:
        mean, std: per-channel normalisation applied last (and by ``normalize``); a single
            value applies to every channel.
        crop_scale: range of the crop's area as a fraction of the image.
        crop_ratio: range of the crop's aspect ratio (sampled log-uniformly).
        hflip: probability of a horizontal flip.
        rotate: maximum rotation in degrees (uniform in [-rotate, rotate]).
        translate: maximum shift as a fraction of the image size.
        jitter_p: probability of colour jitter; brightness, contrast, saturation are the
            maximum relative changes and hue the maximum shift in turns (<= 0.5).
        grayscale_p: probability of converting to grayscale (3-channel data only).
        blur_p, blur_sigma: probability and sigma range (pixels) of a Gaussian blur whose
            kernel spans about 10% of the image.
        solarize_p: probability of inverting pixels above 0.5.
        local_crops: number K of local crops ``views`` adds after the two global views
            (0: none, the two-view recipe).
        local_crop_size: side of the local crops in pixels; None: 3/7 of the image's
            shorter side, DINO's 96 of 224.
        local_crop_scale: range of a local crop's area as a fraction of the image (DINO's
            (0.05, 0.4); the global crops use ``crop_scale``).
    Local crops go through the same pipeline (flip, colour, blur, ...) at their own size.
    Resampling is bilinear without antialiasing, for local crops too (a 0.4 area crop of a
    32 px image at 14 px shrinks by about 1.4).
    """

    def __init__(
        self,
        mean: Annotated[Sequence[float], NonEmpty],
        std: Annotated[Sequence[Positive], NonEmpty],
        crop_scale: AreaRange = (0.2, 1.0),
        crop_ratio: PositiveRange = (3 / 4, 4 / 3),
        hflip: Probability = 0.5,
        rotate: Annotated[float, Interval(ge=0, le=180)] = 0.0,
        translate: Probability = 0.0,
        jitter_p: Probability = 0.8,
        brightness: NonNegative = 0.4,
        contrast: NonNegative = 0.4,
        saturation: NonNegative = 0.4,
        hue: Annotated[float, Interval(ge=0, le=0.5)] = 0.1,
        grayscale_p: Probability = 0.2,
        blur_p: Probability = 0.0,
        blur_sigma: PositiveRange = (0.1, 2.0),
        solarize_p: Probability = 0.0,
        channels: PositiveInt | None = None,
        local_crops: Count = 0,
        local_crop_size: PositiveInt | None = None,
        local_crop_scale: AreaRange = (0.05, 0.4),
    ):
        if len(mean) != len(std):
            raise ConfigError(
                f"data.mean and data.std differ in length: {list(mean)} vs {list(std)}"
            )
        if channels is not None and len(mean) not in (1, channels):
            raise ConfigError(
                f"data.mean={list(mean)} has {len(mean)} values for data.channels={channels}; "
                f"allowed: 1 value or {channels}"
            )
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self.crop_scale = (float(crop_scale[0]), float(crop_scale[1]))
        self.crop_ratio = (float(crop_ratio[0]), float(crop_ratio[1]))
        self.hflip = hflip
        self.rotate = rotate
        self.translate = translate
        self.jitter_p = jitter_p
        self.brightness = brightness
        self.contrast = contrast
        self.saturation = saturation
        self.hue = hue
        self.grayscale_p = grayscale_p
        self.blur_p = blur_p
        self.blur_sigma = (float(blur_sigma[0]), float(blur_sigma[1]))
        self.solarize_p = solarize_p
        if local_crops < 0 or (local_crop_size is not None and local_crop_size < 1):
            raise ConfigError(
                f"data.augment.local_crops={local_crops}, local_crop_size={local_crop_size} are "
                "not allowed; allowed: local_crops >= 0, local_crop_size null or >= 1"
            )
        self.local_crops = local_crops
        self.local_crop_size = local_crop_size
        self.local_crop_scale = (float(local_crop_scale[0]), float(local_crop_scale[1]))

    def normalize(self, x: Tensor) -> Tensor:
        """uint8 or [0, 1] float (B, C, H, W) -> normalised float32, no augmentation."""
        if x.dtype == torch.uint8:
            x = x.float().div_(255)
        mean = _constant(self.mean, x.device, x.dtype).view(1, -1, 1, 1)
        std = _constant(self.std, x.device, x.dtype).view(1, -1, 1, 1)
        return (x - mean) / std

    def __call__(
        self, x: Tensor, generator: torch.Generator, rows: tuple[int, int] | None = None
    ) -> Tensor:
        """x: uint8 (B, C, H, W) -> one augmented view, float32 (B, C, H, W), normalised.

        ``rows=(offset, total)``: ``x`` is rows offset..offset+B of a global batch of
        ``total`` images (one process's share); parameters are drawn for the whole global
        batch and this share's are used, so each image is augmented the same whatever the
        number of processes.
        """
        return self._augment(x, generator, x.shape[-2:], self.crop_scale, 1, rows)

    def views(
        self, x: Tensor, generator: torch.Generator, rows: tuple[int, int] | None = None
    ) -> list[Tensor]:
        """x: uint8 (B, C, H, W) -> [global 1, global 2, local 1, ..., local K].

        The globals are two calls of ``self`` (so with ``local_crops=0`` this is exactly the
        two-view step); the K locals are float32 (B, C, s, s) with s = ``local_crop_size``,
        each sample and crop with its own parameters, drawn in one pass after the globals'.
        ``rows``: as for ``__call__``.
        """
        views = [self(x, generator, rows), self(x, generator, rows)]
        if self.local_crops > 0:
            side = self.local_crop_size or max(1, round(min(x.shape[-2:]) * 3 / 7))
            local = self._augment(
                x, generator, (side, side), self.local_crop_scale, self.local_crops, rows
            )
            views += list(local.chunk(self.local_crops))  # (K*B, ...) -> K of (B, ...)
        return views

    def _augment(
        self,
        x: Tensor,
        generator: torch.Generator,
        size: Sequence[int],
        crop_scale: tuple[float, float],
        copies: int,
        rows: tuple[int, int] | None = None,
    ) -> Tensor:
        """uint8 (B, C, H, W) -> ``copies`` views of each image, float32 (copies*B, C, *size),
        normalised; row k*B + i is copy k of image i."""
        c = x.shape[1]
        if len(self.mean) not in (1, c):
            raise ValueError(f"images have {c} channels but data.mean has {len(self.mean)}")
        n = x.shape[0]
        b = n * copies  # one set of parameters per output row
        x = x.float().div_(255)
        offset, total = rows or (0, n)
        # Parameters are drawn for every row of the global batch; this share's rows are kept.
        share = (
            None
            if (offset, total) == (0, n)
            else (
                torch.arange(copies, device=x.device)[:, None] * total
                + offset
                + torch.arange(n, device=x.device)
            ).flatten()
        )

        def draw() -> Tensor:
            values = torch.rand(total * copies, generator=generator, device=x.device)
            return values if share is None else values[share]

        def uniform(lo: float, hi: float) -> Tensor:
            return draw().mul_(hi - lo).add_(lo)

        def coin(p: float) -> Tensor:
            return draw() < p

        x = self._geometry(x, uniform, coin, (int(size[0]), int(size[1])), crop_scale, copies)
        if self.jitter_p > 0:
            x = self._jitter(x, coin(self.jitter_p), uniform)
        if self.grayscale_p > 0 and c == 3:
            x = torch.where(coin(self.grayscale_p).view(b, 1, 1, 1), _gray(x).expand_as(x), x)
        if self.blur_p > 0:
            x = self._blur(x, coin(self.blur_p), uniform(*self.blur_sigma))
        if self.solarize_p > 0:
            flip = coin(self.solarize_p).view(b, 1, 1, 1) & (x >= 0.5)
            x = torch.where(flip, 1 - x, x)
        return self.normalize(x)

    def _geometry(
        self, x: Tensor, uniform, coin, size: tuple[int, int], crop_scale, copies: int
    ) -> Tensor:
        """Random resized crop, flip, rotation and shift as one affine resampling:
        (B, C, H, W) -> (copies*B, C, *size)."""
        b = x.shape[0] * copies
        area = uniform(*crop_scale)
        log_ratio = uniform(math.log(self.crop_ratio[0]), math.log(self.crop_ratio[1]))
        ratio = log_ratio.exp()
        w = (area * ratio).sqrt().clamp(max=1.0)  # crop width / image width
        h = (area / ratio).sqrt().clamp(max=1.0)
        cx = uniform(-1, 1) * (1 - w)  # crop centre, normalised coords
        cy = uniform(-1, 1) * (1 - h)
        if self.translate > 0:
            cx = cx + uniform(-1, 1) * 2 * self.translate
            cy = cy + uniform(-1, 1) * 2 * self.translate
        sign = torch.ones(b, device=x.device)
        if self.hflip > 0:
            sign = torch.where(coin(self.hflip), -sign, sign)
        angle = (
            uniform(-1, 1) * math.radians(self.rotate)
            if self.rotate > 0
            else torch.zeros(b, device=x.device)
        )
        cos, sin = angle.cos(), angle.sin()
        theta = torch.stack(
            [
                torch.stack([w * cos * sign, -w * sin, cx], dim=1),
                torch.stack([h * sin * sign, h * cos, cy], dim=1),
            ],
            dim=1,
        )  # (copies*B, 2, 3): output -> input coords
        h, w = size
        grid = _affine_grid(theta, h, w)  # (copies*B, h, w, 2)
        if copies > 1:
            # Copy k of image i is rows k*h..(k+1)*h of image i's grid: grid_sample reads each
            # image once, without repeating the batch in memory.
            n = x.shape[0]
            grid = grid.view(copies, n, h, w, 2).transpose(0, 1).reshape(n, copies * h, w, 2)
        # "border": a crop's outermost output pixels sample between the last image pixel and
        # the image edge; zero padding would darken them (by up to half on small crops).
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
        if copies > 1:
            out = out.view(n, -1, copies, h, w).permute(2, 0, 1, 3, 4).reshape(b, -1, h, w)
        return out

    def _jitter(self, x: Tensor, apply: Tensor, uniform) -> Tensor:
        b, c = x.shape[:2]

        def factor(strength: float) -> Tensor:
            f = uniform(max(0.0, 1 - strength), 1 + strength)
            return torch.where(apply, f, torch.ones_like(f)).view(b, 1, 1, 1)

        if self.brightness > 0:
            x = (x * factor(self.brightness)).clamp_(0, 1)
        if self.contrast > 0:
            mean = _gray(x).mean(dim=(1, 2, 3), keepdim=True)
            x = torch.lerp(mean, x, factor(self.contrast)).clamp_(0, 1)
        if c == 3 and self.saturation > 0:
            x = torch.lerp(_gray(x), x, factor(self.saturation)).clamp_(0, 1)
        if c == 3 and self.hue > 0:
            turns = torch.where(
                apply, uniform(-self.hue, self.hue), torch.zeros(b, device=x.device)
            )
            x = torch.einsum("bij,bjhw->bihw", _hue_matrices(turns), x).clamp_(0, 1)
        return x

    def _blur(self, x: Tensor, apply: Tensor, sigma: Tensor) -> Tensor:
        """Separable Gaussian blur with a per-sample sigma (grouped convolution)."""
        b, c, h, w = x.shape
        size = max(3, int(0.1 * min(h, w)) // 2 * 2 + 1)
        offsets = torch.arange(size, device=x.device, dtype=x.dtype) - size // 2
        kernel = torch.exp(-(offsets[None, :] ** 2) / (2 * sigma[:, None] ** 2))  # (B, size)
        identity = (offsets == 0).to(x.dtype).expand(b, size)
        kernel = torch.where(apply[:, None], kernel / kernel.sum(1, keepdim=True), identity)
        kernel = kernel.repeat_interleave(c, dim=0)  # (B*C, size)
        pad = size // 2
        y = F.pad(x.reshape(1, b * c, h, w), (pad, pad, pad, pad), mode="reflect")
        y = F.conv2d(y, kernel.view(b * c, 1, size, 1), groups=b * c)
        y = F.conv2d(y, kernel.view(b * c, 1, 1, size), groups=b * c)
        return y.view(b, c, h, w)


def _affine_grid(theta: Tensor, h: int, w: int) -> Tensor:
    """``F.affine_grid(theta, (B, C, h, w), align_corners=False)`` by broadcasting.

    affine_grid is a batched matmul with an inner size of 3, which CPU BLAS runs so slowly
    that it took half of the augmentation's time; this is a few multiply-adds per pixel.
    theta: (B, 2, 3) -> grid (B, h, w, 2) of input coordinates at each output pixel centre.
    """
    xs = (torch.arange(w, device=theta.device, dtype=theta.dtype) * 2 + 1) / w - 1
    ys = (torch.arange(h, device=theta.device, dtype=theta.dtype) * 2 + 1) / h - 1
    t = theta[..., None, None]  # (B, 2, 3, 1, 1)
    grid = t[:, :, 0] * xs + (t[:, :, 1] * ys[:, None] + t[:, :, 2])  # (B, 2, h, w)
    return grid.permute(0, 2, 3, 1)


def _gray(x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, 1, H, W) luma (a 1-channel image is its own luma)."""
    if x.shape[1] == 1:
        return x
    weights = _constant(_LUMA, x.device, x.dtype).view(1, 3, 1, 1)
    return (x * weights).sum(dim=1, keepdim=True)


def _hue_matrices(turns: Tensor) -> Tensor:
    """(B,) hue shifts in turns -> (B, 3, 3) RGB matrices rotating the YIQ chroma plane."""
    to_yiq = _constant(_RGB_TO_YIQ, turns.device, turns.dtype)
    from_yiq = _constant(_YIQ_TO_RGB, turns.device, turns.dtype)  # no linalg.inv: it syncs on CUDA
    angle = turns * 2 * math.pi
    cos, sin = angle.cos(), angle.sin()
    one, zero = torch.ones_like(cos), torch.zeros_like(cos)
    rotation = torch.stack(
        [
            torch.stack([one, zero, zero], 1),
            torch.stack([zero, cos, -sin], 1),
            torch.stack([zero, sin, cos], 1),
        ],
        1,
    )
    return from_yiq @ rotation @ to_yiq

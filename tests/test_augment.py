"""Batched augmentation: shapes and ranges, per-sample randomness, seeding, and each option
checked on an image where its effect can be computed."""

from __future__ import annotations

import math

import pytest
import torch

from contrastive_cli.data.augment import Augment, _hue_matrices
from contrastive_cli.errors import ConfigError

LUMA = torch.tensor([0.299, 0.587, 0.114])
CIFAR = dict(mean=[0.4914, 0.4822, 0.4465], std=[0.2470, 0.2435, 0.2616])  # conf/data/cifar10
OFF = dict(
    crop_scale=(1, 1),
    crop_ratio=(1, 1),
    hflip=0.0,
    rotate=0.0,
    translate=0.0,
    jitter_p=0.0,
    grayscale_p=0.0,
    blur_p=0.0,
    solarize_p=0.0,
)


def only(channels: int, **options: object) -> Augment:
    """Every option off (full-size crop, no colour change), identity normalisation, then
    ``options``."""
    return Augment(mean=[0.0] * channels, std=[1.0] * channels, **{**OFF, **options})


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(b: int, c: int, size: int, lo: int = 0, hi: int = 256, seed: int = 0) -> torch.Tensor:
    return torch.randint(lo, hi, (b, c, size, size), generator=gen(seed), dtype=torch.uint8)


def as_float(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 255


# --------------------------------------------------------------------------- output and seeding
@pytest.mark.parametrize("c,size", [(1, 8), (1, 28), (3, 32)])
def test_output_shape_dtype_and_range(c, size):
    mean, std = (CIFAR["mean"], CIFAR["std"]) if c == 3 else ([0.1307], [0.3081])
    augment = Augment(mean=mean, std=std, rotate=10, translate=0.1, blur_p=0.5, solarize_p=0.2)
    x = images(16, c, size)
    out = augment(x, gen())
    assert out.shape == x.shape and out.dtype == torch.float32
    pixels = out * torch.tensor(std).view(1, -1, 1, 1) + torch.tensor(mean).view(1, -1, 1, 1)
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5  # a normalised [0, 1] image
    assert x.dtype == torch.uint8  # the input is untouched


def test_every_sample_of_a_batch_gets_its_own_parameters():
    """The same image repeated B times gives B different views."""
    x = images(1, 3, 16).repeat(16, 1, 1, 1)
    out = Augment(**CIFAR)(x, gen()).flatten(1)
    distances = torch.cdist(out, out) + torch.eye(16) * 1e9
    assert distances.min() > 1e-3


def test_the_same_seed_gives_the_same_views_and_another_seed_other_views():
    augment, x = Augment(**CIFAR, blur_p=0.5, solarize_p=0.5), images(8, 3, 16)
    assert torch.equal(augment(x, gen(1)), augment(x, gen(1)))
    assert not torch.allclose(augment(x, gen(1)), augment(x, gen(2)))
    g = gen(1)  # two draws from one generator: two views
    assert not torch.allclose(augment(x, g), augment(x, g))


def test_everything_off_is_the_identity():
    x = images(4, 3, 12)
    assert torch.allclose(only(3)(x, gen()), as_float(x), atol=1e-6)


def test_normalize_is_x_over_255_minus_mean_over_std():
    augment = Augment(**CIFAR)
    x = images(2, 3, 4)
    mean, std = (
        torch.tensor(CIFAR["mean"]).view(1, 3, 1, 1),
        torch.tensor(CIFAR["std"]).view(1, 3, 1, 1),
    )
    expected = (x.float() / 255 - mean) / std
    assert augment.normalize(x).dtype == torch.float32
    assert torch.allclose(augment.normalize(x), expected, atol=1e-6)
    assert torch.allclose(augment.normalize(x.float() / 255), expected, atol=1e-6)  # [0, 1] floats


def test_channel_mismatches_are_errors():
    with pytest.raises(ValueError, match="channels"):
        Augment(**CIFAR)(images(2, 1, 8), gen())
    with pytest.raises(ConfigError, match="differ in length"):
        Augment(mean=[0.5, 0.5], std=[0.2])


# --------------------------------------------------------------------------- geometry
def test_hflip_one_with_a_full_size_crop_mirrors_the_image():
    x = images(4, 3, 10)
    assert torch.allclose(only(3, hflip=1.0)(x, gen()), as_float(x).flip(-1), atol=1e-6)


def test_hflip_half_flips_some_samples_and_not_others():
    x = images(1, 1, 9).repeat(64, 1, 1, 1)
    out = only(1, hflip=0.5)(x, gen())
    flipped = (out - as_float(x).flip(-1)).flatten(1).abs().amax(1) < 1e-6
    kept = (out - as_float(x)).flatten(1).abs().amax(1) < 1e-6
    assert bool((flipped ^ kept).all()) and 10 < int(flipped.sum()) < 54


def blob(size: int, row: float, col: float, b: int, sigma: float = 1.5) -> torch.Tensor:
    """A Gaussian spot centred at pixel (row, col), repeated b times, as uint8."""
    r, c = torch.meshgrid(torch.arange(size).float(), torch.arange(size).float(), indexing="ij")
    spot = torch.exp(-((r - row) ** 2 + (c - col) ** 2) / (2 * sigma**2))
    return (spot * 255).round().to(torch.uint8).expand(b, 1, size, size).contiguous()


def centroids(out: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) -> (B, 2) intensity-weighted (row, col)."""
    h, w = out.shape[-2:]
    r, c = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    mass = out.sum(dim=(1, 2, 3))
    return torch.stack([(out[:, 0] * r).sum((1, 2)) / mass, (out[:, 0] * c).sum((1, 2)) / mass], 1)


def test_rotate_turns_the_image_about_its_centre_by_at_most_the_angle():
    size, centre, radius, max_deg = 33, 16.0, 10.0, 30
    out = only(1, rotate=max_deg)(blob(size, centre, centre + radius, b=64), gen())
    rel = centroids(out) - centre
    assert torch.allclose(rel.norm(dim=1), torch.full((64,), radius), atol=0.3)  # distance kept
    angles = torch.rad2deg(torch.atan2(rel[:, 0], rel[:, 1]))
    assert angles.abs().max() <= max_deg + 1
    assert angles.std() > max_deg / 4  # spread out


def test_translate_shifts_by_at_most_the_fraction_of_the_size():
    size, fraction = 32, 0.1
    out = only(1, translate=fraction)(blob(size, 15.5, 15.5, b=64), gen())
    shift = centroids(out) - 15.5
    assert shift.abs().max() <= fraction * size + 0.3
    assert shift.abs().max() > 1.0


def test_crop_scale_zooms_in_by_the_side_ratio():
    """A crop of a quarter of the area (half the side) resized to full size doubles the slope
    of a horizontal ramp; the crops sit at different places for different samples."""
    size = 64
    ramp = (torch.arange(size) * 4).to(torch.uint8).expand(16, 1, size, size).contiguous()
    out = only(1, crop_scale=(0.25, 0.25))(ramp, gen())
    slopes = out[:, 0, 3:-3, 3:-3].diff(dim=-1) * 255  # per output pixel, inside
    assert torch.allclose(slopes, torch.full_like(slopes, 2.0), atol=1e-3)
    starts = out[:, 0, size // 2, size // 2]
    assert starts.std() > 0.01


# --------------------------------------------------------------------------- colour
def per_sample_ratio(num: torch.Tensor, den: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B,) the ratio num/den where mask; asserts it is one number per sample."""
    ratios = []
    for n, d, m in zip(num, den, mask, strict=True):
        r = n[m] / d[m]
        assert torch.allclose(r, r.mean().expand_as(r), atol=1e-4), "not one factor per sample"
        ratios.append(r.mean())
    return torch.stack(ratios)


@pytest.mark.parametrize("c", [1, 3])
def test_brightness_scales_each_sample_by_one_factor_in_range(c):
    x = images(32, c, 6, lo=20, hi=150)  # x 1.5 stays below 1
    out = only(c, jitter_p=1.0, brightness=0.5, contrast=0.0, saturation=0.0, hue=0.0)(x, gen())
    factors = per_sample_ratio(out, as_float(x), torch.ones_like(out, dtype=torch.bool))
    assert factors.min() >= 0.5 - 1e-5 and factors.max() <= 1.5 + 1e-5
    assert factors.std() > 0.1


@pytest.mark.parametrize("c", [1, 3])
def test_contrast_scales_the_distance_to_the_mean_luma(c):
    x = images(32, c, 6, lo=90, hi=166)  # |x - mean| * 1.5 stays in [0, 1]
    out = only(c, jitter_p=1.0, brightness=0.0, contrast=0.5, saturation=0.0, hue=0.0)(x, gen())
    xf = as_float(x)
    luma = (xf * LUMA.view(1, 3, 1, 1)).sum(1, keepdim=True) if c == 3 else xf
    mean = luma.mean(dim=(1, 2, 3), keepdim=True)
    mask = (xf - mean).abs() > 0.05
    factors = per_sample_ratio(out - mean, xf - mean, mask)
    assert factors.min() >= 0.5 - 1e-4 and factors.max() <= 1.5 + 1e-4 and factors.std() > 0.1


def test_saturation_scales_the_distance_to_each_pixels_gray():
    x = images(32, 3, 6, lo=90, hi=166)
    out = only(3, jitter_p=1.0, brightness=0.0, contrast=0.0, saturation=0.5, hue=0.0)(x, gen())
    xf = as_float(x)
    gray = (xf * LUMA.view(1, 3, 1, 1)).sum(1, keepdim=True)
    assert torch.allclose((out * LUMA.view(1, 3, 1, 1)).sum(1, keepdim=True), gray, atol=1e-5)
    factors = per_sample_ratio(out - gray, xf - gray, (xf - gray).abs() > 0.05)
    assert factors.min() >= 0.5 - 1e-4 and factors.max() <= 1.5 + 1e-4 and factors.std() > 0.1


def test_saturation_and_hue_do_nothing_to_one_channel_images():
    x = images(8, 1, 8)
    common = dict(jitter_p=1.0, brightness=0.4, contrast=0.4)
    plain = only(1, **common, saturation=0.0, hue=0.0)(x, gen(3))
    assert torch.equal(only(1, **common, saturation=0.8, hue=0.4)(x, gen(3)), plain)


def test_jitter_probability_leaves_some_samples_unchanged():
    x = images(64, 3, 4, lo=20, hi=150)
    out = only(3, jitter_p=0.5, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1)(x, gen())
    unchanged = (out - as_float(x)).flatten(1).abs().amax(1) < 1e-6
    assert 10 < int(unchanged.sum()) < 54


def test_hue_matrices_of_zero_and_a_full_turn_are_the_identity():
    eye = torch.eye(3).expand(2, 3, 3)
    assert torch.allclose(_hue_matrices(torch.zeros(2)), eye, atol=1e-6)
    assert torch.allclose(_hue_matrices(torch.tensor([1.0, -1.0])), eye, atol=1e-5)


def test_hue_half_turn_reflects_the_colour_through_its_gray():
    """Half a turn negates the chroma (I, Q), keeping luma Y: rgb -> 2 * luma - rgb."""
    rgb = torch.tensor([0.6, 0.4, 0.5])
    out = _hue_matrices(torch.tensor([0.5]))[0] @ rgb
    assert torch.allclose(out, 2 * (LUMA @ rgb) - rgb, atol=1e-5)


def test_hue_jitter_keeps_luma_and_grays_and_changes_colours():
    b = 32
    colour = torch.tensor([140, 110, 125], dtype=torch.uint8).view(1, 3, 1, 1).expand(b, 3, 4, 4)
    gray = torch.full((b, 3, 4, 4), 120, dtype=torch.uint8)
    x = torch.cat([colour, gray], dim=3).contiguous()  # left half colour, right gray
    out = only(3, jitter_p=1.0, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.5)(x, gen())
    xf = as_float(x)
    assert torch.allclose(out[..., 4:], xf[..., 4:], atol=1e-5)  # grays stay
    luma = lambda t: (t * LUMA.view(1, 3, 1, 1)).sum(1)  # noqa: E731
    assert torch.allclose(luma(out), luma(xf), atol=1e-5)  # Y is kept
    assert (out[:, :, 0, 0] - xf[:, :, 0, 0]).abs().amax(1).min() > 0  # hues move
    assert out[:, :, 0, 0].std(0).max() > 0.01  # differently


# --------------------------------------------------------------------- grayscale, blur, solarize
def test_grayscale_gives_equal_channels_holding_the_luma():
    x = images(4, 3, 8)
    out = only(3, grayscale_p=1.0)(x, gen())
    expected = (as_float(x) * LUMA.view(1, 3, 1, 1)).sum(1, keepdim=True).expand_as(out)
    assert torch.allclose(out, expected, atol=1e-5)


def test_grayscale_leaves_one_channel_images_alone():
    x = images(4, 1, 8)
    assert torch.allclose(only(1, grayscale_p=1.0)(x, gen()), as_float(x), atol=1e-6)


def test_blur_spreads_an_impulse_into_a_normalised_gaussian():
    x = torch.zeros(2, 1, 16, 16, dtype=torch.uint8)
    x[:, :, 8, 8] = 255
    out = only(1, blur_p=1.0, blur_sigma=(1.0, 1.0))(x, gen())
    k = torch.tensor([math.exp(-0.5), 1.0, math.exp(-0.5)])  # 3 taps at 16 px, sigma 1
    k = k / k.sum()
    expected = torch.zeros(16, 16)
    expected[7:10, 7:10] = torch.outer(k, k)
    assert torch.allclose(out[:, 0], expected.expand(2, 16, 16), atol=1e-6)


def test_blur_keeps_a_constant_image_constant_up_to_the_borders():
    x = torch.full((2, 3, 12, 12), 77, dtype=torch.uint8)
    out = only(3, blur_p=1.0)(x, gen())
    assert torch.allclose(out, as_float(x), atol=1e-6)


def test_solarize_inverts_the_pixels_above_one_half():
    x = images(4, 3, 8)
    xf = as_float(x)
    expected = torch.where(xf >= 0.5, 1 - xf, xf)
    assert torch.allclose(only(3, solarize_p=1.0)(x, gen()), expected, atol=1e-6)


# --------------------------------------------------------------------------- multi-crop views
def test_views_without_local_crops_are_the_two_view_step():
    """views() with local_crops=0 is exactly two calls, drawing the same random numbers."""
    augment, x = Augment(**CIFAR, blur_p=0.5, solarize_p=0.2), images(8, 3, 16)
    g1, g2 = gen(4), gen(4)
    got = augment.views(x, g1)
    expected = [augment(x, g2), augment(x, g2)]
    assert len(got) == 2 and all(torch.equal(a, b) for a, b in zip(got, expected, strict=True))
    assert torch.equal(g1.get_state(), g2.get_state())


@pytest.mark.parametrize("c,size,local_size,expected_side", [(3, 32, None, 14), (1, 28, 10, 10)])
def test_views_shapes_global_then_local(c, size, local_size, expected_side):
    mean, std = (CIFAR["mean"], CIFAR["std"]) if c == 3 else ([0.1307], [0.3081])
    augment = Augment(mean=mean, std=std, local_crops=4, local_crop_size=local_size)
    x = images(5, c, size)
    views = augment.views(x, gen())
    assert [tuple(v.shape) for v in views] == [(5, c, size, size)] * 2 + [
        (5, c, expected_side, expected_side)
    ] * 4
    assert all(v.dtype == torch.float32 for v in views)
    # The globals are those of the two-view step: the locals are drawn after them.
    two = Augment(mean=mean, std=std).views(x, gen())
    assert torch.equal(views[0], two[0]) and torch.equal(views[1], two[1])


def test_each_local_crop_comes_from_its_own_image_and_channel():
    """Image i is constant, with value 10 i + 80 c in channel c: with colour off, every local
    crop of image i holds exactly those values (rows and channels are not mixed up)."""
    b = 6
    values = torch.arange(b).view(b, 1) * 10 + torch.tensor([0, 80, 160]).view(1, 3)
    x = values.view(b, 3, 1, 1).expand(b, 3, 12, 12).to(torch.uint8).contiguous()
    augment = only(3, hflip=0.5, crop_scale=(0.2, 1.0), local_crops=3, local_crop_size=5)
    for view in augment.views(x, gen()):
        expected = as_float(values.view(b, 3, 1, 1)).expand_as(view)
        assert torch.allclose(view, expected, atol=1e-6)


def test_every_sample_and_every_local_crop_gets_its_own_parameters():
    """One image repeated: all K x B local crops differ from each other."""
    k, b = 4, 8
    augment = Augment(**CIFAR, local_crops=k, local_crop_size=8)
    local = torch.cat(augment.views(images(1, 3, 16).repeat(b, 1, 1, 1), gen())[2:]).flatten(1)
    assert local.shape[0] == k * b
    distances = torch.cdist(local, local) + torch.eye(k * b) * 1e9
    assert distances.min() > 1e-3


def test_local_crops_use_their_own_scale_and_size():
    """A horizontal ramp of 4 levels per pixel; a local crop of a quarter of the area (32 px
    of the 64) resized to 16 px rises 8 levels per output pixel. The global views, with the
    full-image crop, keep the ramp's slope of 4."""
    size = 64
    ramp = (torch.arange(size) * 4).to(torch.uint8).expand(4, 1, size, size).contiguous()
    augment = only(1, local_crops=2, local_crop_size=16, local_crop_scale=(0.25, 0.25))
    views = augment.views(ramp, gen())
    for local in views[2:]:
        slopes = local[:, 0, 2:-2, 2:-2].diff(dim=-1) * 255
        assert torch.allclose(slopes, torch.full_like(slopes, 8.0), atol=1e-3)
    slopes = views[0][:, 0, 2:-2, 2:-2].diff(dim=-1) * 255
    assert torch.allclose(slopes, torch.full_like(slopes, 4.0), atol=1e-3)


def test_multi_crop_views_are_reproducible_by_seed():
    augment = Augment(**CIFAR, blur_p=0.5, local_crops=3, local_crop_size=6)
    x = images(4, 3, 16)
    a, b, other = augment.views(x, gen(7)), augment.views(x, gen(7)), augment.views(x, gen(8))
    assert all(torch.equal(p, q) for p, q in zip(a, b, strict=True))
    assert not any(torch.allclose(p, q) for p, q in zip(a, other, strict=True))


def test_bad_local_crop_settings_are_config_errors():
    with pytest.raises(ConfigError, match="local_crops"):
        Augment(**CIFAR, local_crops=-1)
    with pytest.raises(ConfigError, match="local_crop_size"):
        Augment(**CIFAR, local_crops=2, local_crop_size=0)

"""Any timm model as an encoder: images (B, C, H, W) -> pooled features (B, out_dim).

timm builds the model without its classifier (``num_classes=0``), for ``data.channels``
input channels and, for models built for one image size (ViTs, Swin...), for
``data.image_size``. The shipped recipes (conf/encoder/resnet50.yaml, vit_tiny.yaml,
vit_small.yaml, convnext_tiny.yaml) are this class with a model name and small-image
settings: a 3x3/1 ResNet stem without max-pool, a 2x2/2 ConvNeXt stem (1x1/1 below 16 px), a ViT patch size
chosen from the image size.
"""

from __future__ import annotations

import difflib
from typing import Any, Literal

from torch import Tensor, nn

from contrastive_cli.errors import ConfigError
from contrastive_cli.schema import Kwargs, PositiveInt, Text

SMALL_BELOW = 96  # px: below this, stem=auto means the small-image stem (as resnet18's)


def auto_patch(image_size: int) -> int:
    """The ViT patch for ``patch_size=auto``: 16 from 128 px (ImageNet's 224 px: 14x14
    tokens), 8 from 64 px, else 4 (28 px: 7x7 tokens, 32 px: 8x8, as in the CIFAR ViTs)."""
    return 16 if image_size >= 128 else 8 if image_size >= 64 else 4


class TimmEncoder(nn.Module):
    """A timm model without its classifier; ``out_dim`` is its pooled feature width.

    Attributes: ``model`` (the timm model, ``num_classes=0``), ``timm_name``, ``out_dim``.
    """

    def __init__(
        self,
        in_channels: int,
        image_size: int,
        name: Text,
        kwargs: Kwargs | None = None,
        stem: Literal["auto", "small", "imagenet"] = "imagenet",
        patch_size: Literal["auto"] | PositiveInt | None = None,
        dynamic_size: bool = True,
        grad_checkpointing: bool = False,
    ):
        super().__init__()
        import timm

        if not timm.is_model(name):
            raise ConfigError(
                f"encoder.name={name} is not allowed: timm has no such model{_near(name)}; "
                "allowed: a name from timm.list_models()"
            )
        extra = dict(kwargs or {})
        self.timm_name = name
        self.patch = None
        pretrained_cfg = timm.models.get_pretrained_cfg(name)
        fixed = bool(pretrained_cfg and pretrained_cfg.fixed_input_size)
        if patch_size is not None:
            self.patch = auto_patch(image_size) if patch_size == "auto" else int(patch_size)
            extra.setdefault("patch_size", self.patch)
        if fixed:  # built for one image size: ours
            extra.setdefault("img_size", image_size)
            if dynamic_size:  # other sizes too (DINO's local crops), padded to the patch
                extra.setdefault("dynamic_img_size", True)
                extra.setdefault("dynamic_img_pad", True)
        self.model = _create(timm, name, in_channels, extra, dynamic_size and fixed)
        self.timm_kwargs = extra  # what create_model took besides name, num_classes, in_chans
        self._check_patch(image_size)
        small = stem == "small" or (stem == "auto" and image_size < SMALL_BELOW)
        if small:
            _small_stem(self.model, name, in_channels, image_size, stem)
        if grad_checkpointing:
            try:
                self.model.set_grad_checkpointing(True)
            except (AssertionError, NotImplementedError, AttributeError):
                raise ConfigError(
                    f"encoder.grad_checkpointing=true is not allowed: timm's {name} has no "
                    "gradient checkpointing; allowed: encoder.grad_checkpointing=false"
                ) from None
        self.out_dim = int(getattr(self.model, "head_hidden_size", None) or self.model.num_features)

    def _check_patch(self, image_size: int) -> None:
        embed = getattr(self.model, "patch_embed", None)
        size = getattr(embed, "patch_size", None)
        if size is None:
            return
        patch = size[0] if isinstance(size, (tuple, list)) else int(size)
        self.patch = patch
        if image_size % patch:
            raise ConfigError(
                f"data.image_size={image_size} is not allowed with encoder.name={self.timm_name} "
                f"(patch {patch}): the image must be a whole number of patches; allowed: a "
                f"multiple of {patch}, or encoder.patch_size dividing {image_size}"
            )

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)


def _near(name: str) -> str:
    import timm

    close = difflib.get_close_matches(name, timm.list_models(), n=4, cutoff=0.6)
    return f" (did you mean {', '.join(close)}?)" if close else ""


def _create(timm: Any, name: str, in_channels: int, extra: dict, dynamic: bool) -> nn.Module:
    try:
        return timm.create_model(
            name, pretrained=False, num_classes=0, in_chans=in_channels, **extra
        )
    except TypeError as e:
        if dynamic and "dynamic_img" in str(e):
            raise ConfigError(
                f"encoder.dynamic_size=true is not allowed: timm's {name} is built for one "
                "image size only; allowed: encoder.dynamic_size=false"
            ) from None
        key = next((k for k in extra if repr(k) in str(e)), None)
        if key is None:
            raise
        raise ConfigError(
            f"encoder.kwargs.{key}={extra[key]!r} is not allowed: timm's {name} takes no "
            f"'{key}'; allowed: the keyword arguments of its model class"
        ) from None


def _small_stem(model: nn.Module, name: str, in_channels: int, image_size: int, stem: str) -> None:
    """Replace an ImageNet stem by a small-image one, in place: ResNets get a 3x3/1 conv and
    no max-pool (SimCLR's CIFAR ResNet), ConvNeXts a 2x2/2 patchify conv (4x4/4 at ImageNet
    size; 1x1/1 below 16 px, where three 2x2/2 downsamplings follow). Other models keep theirs (stem=auto) or are refused (stem=small)."""
    conv1, stem_seq = getattr(model, "conv1", None), getattr(model, "stem", None)
    if isinstance(conv1, nn.Conv2d) and hasattr(model, "maxpool"):
        model.conv1 = nn.Conv2d(in_channels, conv1.out_channels, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
    elif (
        isinstance(stem_seq, nn.Sequential)
        and isinstance(stem_seq[0], nn.Conv2d)
        and type(model).__name__ == "ConvNeXt"
    ):
        old = stem_seq[0]
        k = 2 if image_size >= 16 else 1
        stem_seq[0] = nn.Conv2d(in_channels, old.out_channels, k, k, bias=old.bias is not None)
    elif stem == "small":
        raise ConfigError(
            f"encoder.stem=small is not allowed for timm's {name}: only ResNets and ConvNeXts "
            "have a small-image stem here; allowed: encoder.stem=imagenet or auto"
        )

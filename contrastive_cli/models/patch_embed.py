"""A ViT's patch embedding kept at its random initialisation (MoCo v3's stability trick).

Chen, Xie & He (2021), section 4.2: training a ViT with a contrastive loss shows sudden drops
of accuracy ("dips") that start from the first layer; a random patch projection that is
never trained removes them and improves accuracy (ViT-B/16, ImageNet: 69.7 -> 71.1 linear,
the default of their ViT recipe, ``--stop-grad-conv1``). The patch projection is a linear map
of each patch, a Conv2d with kernel = stride = patch; it is re-initialised as the authors' code
does (Xavier uniform over the patch's C x p x p inputs and the D outputs, zero bias) and takes
no gradient, so the optimizer never receives it and weight decay never shrinks it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from contrastive_cli.errors import ConfigError


def patch_projection(model: nn.Module) -> nn.Conv2d | None:
    """The Conv2d that embeds the patches (timm's ViT, DeiT, ViT-style models:
    ``model.patch_embed.proj``), or None when the model has none."""
    proj = getattr(getattr(model, "patch_embed", None), "proj", None)
    return proj if isinstance(proj, nn.Conv2d) else None


@torch.no_grad()
def freeze_random_patch_embed(model: nn.Module, name: str) -> nn.Conv2d:
    """Re-initialise ``model``'s patch projection at random (Xavier uniform, bound
    sqrt(6 / (C p_h p_w + D)); bias 0) and stop its gradient. ``name`` names the model in the
    error for a model without a patch embedding. Returns the projection."""
    proj = patch_projection(model)
    if proj is None:
        raise ConfigError(
            f"encoder.freeze_patch_embed=true is not allowed with {name}: it has no patch "
            "embedding (a ViT's patch_embed.proj); allowed: a ViT encoder (encoder=vit_tiny, "
            "vit_small), or encoder.freeze_patch_embed=false"
        )
    d, c, ph, pw = proj.weight.shape  # (D, C, p, p)
    bound = math.sqrt(6.0 / (c * ph * pw + d))
    nn.init.uniform_(proj.weight, -bound, bound)
    if proj.bias is not None:
        nn.init.zeros_(proj.bias)
    for p in proj.parameters():
        p.requires_grad_(False)
    return proj

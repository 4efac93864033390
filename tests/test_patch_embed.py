"""MoCo v3's frozen random patch embedding: re-initialised as the authors' code, never
trained, refused for encoders without one."""

from __future__ import annotations

import math

import pytest
import timm
import torch

from contrastive_cli.errors import ConfigError
from contrastive_cli.models.encoders import ConvNet
from contrastive_cli.models.patch_embed import freeze_random_patch_embed, patch_projection


def tiny_vit() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        num_classes=0,
        in_chans=1,
        img_size=8,
        patch_size=4,
        depth=1,
    )


def test_the_patch_projection_is_redrawn_xavier_uniform_with_zero_bias_and_no_gradient():
    vit = tiny_vit()
    proj = freeze_random_patch_embed(vit, "vit_tiny")
    assert proj is vit.patch_embed.proj and proj.weight.shape == (192, 1, 4, 4)
    bound = math.sqrt(6 / (1 * 4 * 4 + 192))  # the authors' sqrt(6 / (3 p p + D)), C=1 here
    w = proj.weight
    assert w.abs().max() <= bound and w.abs().max() > 0.95 * bound  # fills the interval
    assert abs(w.std().item() - bound / math.sqrt(3)) < 0.05 * bound  # uniform's std
    assert torch.equal(proj.bias, torch.zeros(192))
    assert not proj.weight.requires_grad and not proj.bias.requires_grad
    others = [p for n, p in vit.named_parameters() if not n.startswith("patch_embed.proj")]
    assert others and all(p.requires_grad for p in others)


def test_training_with_weight_decay_leaves_the_frozen_projection_unchanged():
    """AdamW with weight decay 0.1 over the parameters that take a gradient (what the builder
    gives the optimizer): the projection keeps every bit, the rest moves."""
    vit = tiny_vit()
    freeze_random_patch_embed(vit, "vit_tiny")
    before = {n: p.clone() for n, p in vit.named_parameters()}
    opt = torch.optim.AdamW(
        [p for p in vit.parameters() if p.requires_grad], 1e-2, weight_decay=0.1
    )
    for _ in range(2):
        opt.zero_grad()
        vit(torch.randn(4, 1, 8, 8)).square().mean().backward()
        opt.step()
    after = dict(vit.named_parameters())
    assert torch.equal(after["patch_embed.proj.weight"], before["patch_embed.proj.weight"])
    assert torch.equal(after["patch_embed.proj.bias"], before["patch_embed.proj.bias"])
    assert not torch.equal(after["blocks.0.attn.qkv.weight"], before["blocks.0.attn.qkv.weight"])


def test_an_encoder_without_a_patch_embedding_is_refused_naming_the_setting():
    cnn = ConvNet(1, 8)
    assert patch_projection(cnn) is None
    with pytest.raises(
        ConfigError, match=r"encoder.freeze_patch_embed=true is not allowed with cnn"
    ):
        freeze_random_patch_embed(cnn, "cnn")


def test_the_timm_encoder_setting_freezes_a_vits_and_refuses_a_resnets():
    from contrastive_cli.models.timm_encoder import TimmEncoder

    torch.manual_seed(0)
    vit = TimmEncoder(
        1, 8, "vit_tiny_patch16_224", {"depth": 1}, patch_size=4, freeze_patch_embed=True
    )
    assert not any(p.requires_grad for p in vit.model.patch_embed.proj.parameters())
    assert torch.equal(vit.model.patch_embed.proj.bias, torch.zeros(192))
    with pytest.raises(
        ConfigError, match="freeze_patch_embed=true is not allowed with timm's resnet18"
    ):
        TimmEncoder(1, 8, "resnet18", freeze_patch_embed=True)

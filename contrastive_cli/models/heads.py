"""Projector, predictor and DINO heads: small MLPs on top of an encoder."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from contrastive_cli.schema import PositiveInt

Activation = Literal["relu", "gelu"]
ACTIVATIONS: tuple[str, ...] = ("relu", "gelu")


def mlp_head(
    in_dim: int,
    hidden_dim: PositiveInt,
    out_dim: PositiveInt,
    batch_norm: bool = True,
    layers: PositiveInt = 2,
    output_batch_norm: bool = False,
    activation: Activation = "relu",
) -> nn.Sequential:
    """``layers`` linear layers: (Linear -> [BatchNorm] -> ReLU) x (layers - 1) -> Linear
    -> [BatchNorm without affine].

    The default (2 layers, BatchNorm in the hidden layer) is the head of SimCLR and BYOL;
    MoCo v2's has no BatchNorm. SimSiam, Barlow Twins and VICReg use 3 layers; SimSiam's
    projector also normalises its output (BatchNorm with no learnt scale or shift, as the
    authors' code), which the paper found needed for training to go well. A linear layer
    followed by BatchNorm has no bias (the BatchNorm's mean removes it).

    Args:
        in_dim, hidden_dim, out_dim: >= 1, the widths.
        batch_norm: BatchNorm after every hidden linear layer.
        layers: >= 1 linear layers (1: a single linear map, no hidden layer).
        output_batch_norm: BatchNorm1d(out_dim, affine=False) after the last linear layer.
        activation: the hidden layers' non-linearity, ``relu`` or ``gelu`` (DINO's head).
    """
    for name, value in (("in_dim", in_dim), ("hidden_dim", hidden_dim), ("out_dim", out_dim)):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if layers < 1:
        raise ValueError(f"layers must be >= 1, got {layers}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    modules: list[nn.Module] = []
    width = in_dim
    for _ in range(layers - 1):
        modules.append(nn.Linear(width, hidden_dim, bias=not batch_norm))
        if batch_norm:
            modules.append(nn.BatchNorm1d(hidden_dim))
        modules.append(nn.ReLU(inplace=True) if activation == "relu" else nn.GELU())
        width = hidden_dim
    modules.append(nn.Linear(width, out_dim, bias=not output_batch_norm))
    if output_batch_norm:
        modules.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*modules)


class Prototypes(nn.Module):
    """A weight-normalised linear layer without bias: x (N, D) -> x @ (g * V / ||V||)^T (N, K).

    Row k of V is prototype k, divided by its norm; g (K, 1) is fixed at 1 when ``learn_norm``
    is false (DINO's ``norm_last_layer``, the paper's default), so the logits of a unit input
    are its cosine similarities to the K prototypes. Written out rather than through torch's
    weight-norm parametrisation so that copies (the EMA teacher), DDP and checkpoints see two
    plain tensors.
    """

    def __init__(self, in_dim: int, out_dim: int, learn_norm: bool = False):
        super().__init__()
        if in_dim < 1 or out_dim < 1:
            raise ValueError(f"in_dim and out_dim must be >= 1, got {in_dim}, {out_dim}")
        self.weight = nn.Parameter(torch.empty(out_dim, in_dim))  # V: (K, D)
        nn.init.trunc_normal_(self.weight, std=0.02)
        self.norm = nn.Parameter(torch.ones(out_dim, 1)) if learn_norm else None  # g: (K, 1)

    def forward(self, x: Tensor) -> Tensor:
        weight = F.normalize(self.weight, dim=1)
        if self.norm is not None:
            weight = weight * self.norm
        return x @ weight.T


class DINOHead(nn.Module):
    """DINO's projection head (Caron et al., 2021, section 3.1 and the authors' code):
    MLP (GELU, no BatchNorm by default) -> L2-normalised bottleneck -> ``Prototypes``.

    features (N, in_dim) -> (N, bottleneck_dim) unit vectors -> logits (N, out_dim). The
    MLP's linear layers start from a truncated normal (std 0.02) with zero biases, as the
    authors initialise them. The defaults are the paper's.

    Args:
        in_dim: the encoder's feature size.
        hidden_dim, bottleneck_dim: >= 1, the MLP's widths (2048, 256).
        out_dim: K >= 1, the number of prototypes: the softmax's classes (65536).
        layers: >= 1 linear layers in the MLP (3).
        batch_norm: BatchNorm in the MLP's hidden layers (the paper: none, for ViTs).
        norm_last_layer: keep every prototype's norm at 1 (true, the paper's) or learn it.
    """

    def __init__(
        self,
        in_dim: int,
        hidden_dim: PositiveInt = 2048,
        bottleneck_dim: PositiveInt = 256,
        out_dim: PositiveInt = 65536,
        layers: PositiveInt = 3,
        batch_norm: bool = False,
        norm_last_layer: bool = True,
    ):
        super().__init__()
        self.mlp = mlp_head(
            in_dim, hidden_dim, bottleneck_dim, batch_norm, layers, activation="gelu"
        )
        for m in self.mlp.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        self.prototypes = Prototypes(bottleneck_dim, out_dim, learn_norm=not norm_last_layer)
        self.out_dim = out_dim

    def forward(self, x: Tensor) -> Tensor:
        return self.prototypes(F.normalize(self.mlp(x), dim=1))

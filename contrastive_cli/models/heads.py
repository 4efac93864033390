"""Projector and predictor heads: small MLPs on top of an encoder."""

from __future__ import annotations

from torch import nn


def mlp_head(in_dim: int, hidden_dim: int, out_dim: int, batch_norm: bool = True) -> nn.Sequential:
    """Linear -> [BatchNorm] -> ReLU -> Linear: the two-layer head of SimCLR, MoCo v2, BYOL.

    SimCLR and BYOL use BatchNorm in the hidden layer; MoCo v2's head has none.
    """
    hidden: list[nn.Module] = [nn.Linear(in_dim, hidden_dim, bias=not batch_norm)]
    if batch_norm:
        hidden.append(nn.BatchNorm1d(hidden_dim))
    return nn.Sequential(*hidden, nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim))

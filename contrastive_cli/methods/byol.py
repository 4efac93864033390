"""BYOL: online encoder+projector+predictor regresses an EMA target of the other view."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from contrastive_cli.losses.byol import byol_loss
from contrastive_cli.methods import projector_and_predictor
from contrastive_cli.methods.momentum import cosine_momentum, frozen_copy, update_momentum
from contrastive_cli.schema import PositiveInt, Probability


class BYOL(nn.Module):
    def __init__(
        self,
        encoder: nn.Module,
        projector: Callable[[int], nn.Module],
        predictor: Callable[[int], nn.Module] | None,
        projection_dim: PositiveInt = 256,
        base_momentum: Probability = 0.996,
    ):
        super().__init__()
        self.encoder = encoder
        # loss.predictor=null: no predictor (the ablation of Grill et al. 2020, Table 5b, that
        # collapses); what the label-free metrics' collapse check and study use
        self.projector, self.predictor = projector_and_predictor(
            encoder, projector, predictor or (lambda _: nn.Identity()), projection_dim
        )
        self.target_encoder = frozen_copy(encoder)
        self.target_projector = frozen_copy(self.projector)
        self.base_momentum = base_momentum

    def forward(self, views: Sequence[Tensor], labels: Tensor | None = None) -> Tensor:
        both = torch.cat([views[0], views[1]])
        p1, p2 = self.predictor(self.projector(self.encoder(both))).chunk(2)
        with torch.no_grad():
            t1, t2 = self.target_projector(self.target_encoder(both)).chunk(2)
        return byol_loss(p1, t2) + byol_loss(p2, t1)

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        # `step` counts optimizer steps taken, so the k-th update uses tau(k-1): the base value
        # at the first update, rising towards 1 (it reaches 1 only after the last step).
        m = cosine_momentum(step - 1, total_steps, self.base_momentum)
        update_momentum(self.encoder, self.target_encoder, m)
        update_momentum(self.projector, self.target_projector, m)

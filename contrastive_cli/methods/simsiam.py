"""SimSiam: encoder -> projector -> predictor; each view's prediction regresses the other
view's projection, which takes no gradient (Chen & He, 2021)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from contrastive_cli.losses.simsiam import simsiam_loss
from contrastive_cli.methods import projector_and_predictor
from contrastive_cli.schema import PositiveInt


class SimSiam(nn.Module):
    """loss = 1/2 D(p1, stopgrad(z2)) + 1/2 D(p2, stopgrad(z1)), D the negative cosine
    (paper eq. 4). No momentum copy and no negatives: the stop-gradient and the predictor
    are what keep it from collapsing. Per-sample, so no gather: with several processes the
    mean of their losses is the whole batch's, and BatchNorm is synchronised by the loop."""

    def __init__(
        self,
        encoder: nn.Module,
        projector: Callable[[int], nn.Module],
        predictor: Callable[[int], nn.Module],
        projection_dim: PositiveInt = 2048,
    ):
        super().__init__()
        self.encoder = encoder
        self.projector, self.predictor = projector_and_predictor(
            encoder, projector, predictor, projection_dim
        )

    def forward(self, views: Sequence[Tensor], labels: Tensor | None = None) -> Tensor:
        z = self.projector(self.encoder(torch.cat([views[0], views[1]])))  # (2N, D)
        p1, p2 = self.predictor(z).chunk(2)
        z1, z2 = z.chunk(2)
        return (simsiam_loss(p1, z2) + simsiam_loss(p2, z1)) / 2

    def after_step(self, step: int, total_steps: int) -> None:
        pass

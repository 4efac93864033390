"""SupCon: encoder -> projector -> supervised contrastive loss, positives by class
(Khosla et al., 2020). Needs labelled training data."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from contrastive_cli.distributed import Gather, all_gather
from contrastive_cli.losses.supcon import supcon_loss
from contrastive_cli.schema import Positive


class SupCon(nn.Module):
    """Every view of the same class is a positive of an anchor (its own other view too);
    candidates and their labels come from every process through ``gather``."""

    needs_labels = True  # read by validate.check_data before any data is used

    def __init__(
        self,
        encoder: nn.Module,
        projector: Callable[[int], nn.Module],
        temperature: Positive = 0.1,
        gather: Gather = all_gather,  # the identity in one process
    ):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"loss.temperature must be > 0, got {temperature}")
        self.encoder = encoder
        self.projector = projector(encoder.out_dim)
        self.temperature = temperature
        self.gather = gather

    def forward(self, views: Sequence[Tensor], labels: Tensor | None = None) -> Tensor:
        if labels is None:
            raise ValueError("loss=supcon needs labelled training data")
        z1, z2 = self.projector(self.encoder(torch.cat([views[0], views[1]]))).chunk(2)
        return supcon_loss(z1, z2, labels, self.temperature, self.gather)

    def after_step(self, step: int, total_steps: int) -> None:
        pass

"""SimCLR: encoder -> projector -> NT-Xent over both views."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from contrastive_cli.distributed import Gather, all_gather
from contrastive_cli.losses.ntxent import nt_xent
from contrastive_cli.schema import Positive


class SimCLR(nn.Module):
    def __init__(
        self,
        encoder: nn.Module,
        projector: Callable[[int], nn.Module],
        temperature: Positive = 0.5,
        gather: Gather = all_gather,  # the identity in one process
    ):
        super().__init__()
        self.encoder = encoder
        self.projector = projector(encoder.out_dim)
        self.temperature = temperature
        self.gather = gather

    def forward(self, views: Sequence[Tensor], labels: Tensor | None = None) -> Tensor:
        z1, z2 = self.projector(self.encoder(torch.cat([views[0], views[1]]))).chunk(2)
        return nt_xent(z1, z2, self.temperature, self.gather)

    def after_step(self, step: int, total_steps: int) -> None:
        pass

"""VICReg: encoder -> expander; invariance, variance and covariance terms over the global
batch (Bardes, Ponce & LeCun, 2022)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from contrastive_cli.distributed import Gather, all_gather
from contrastive_cli.losses.vicreg import vicreg_loss
from contrastive_cli.schema import NonNegative


class VICReg(nn.Module):
    """lambda s(Z, Z') + mu (v(Z) + v(Z')) / 2 + nu (c(Z) + c(Z')) on the expander's outputs;
    variance and covariance are over every process's rows through ``gather``."""

    def __init__(
        self,
        encoder: nn.Module,
        expander: Callable[[int], nn.Module],
        sim_coeff: NonNegative = 25.0,
        std_coeff: NonNegative = 25.0,
        cov_coeff: NonNegative = 1.0,
        gather: Gather = all_gather,  # the identity in one process
    ):
        super().__init__()
        for name, value in (
            ("sim_coeff", sim_coeff),
            ("std_coeff", std_coeff),
            ("cov_coeff", cov_coeff),
        ):
            if value < 0:
                raise ValueError(f"loss.{name} must be >= 0, got {value}")
        self.encoder = encoder
        self.expander = expander(encoder.out_dim)
        self.sim_coeff = sim_coeff
        self.std_coeff = std_coeff
        self.cov_coeff = cov_coeff
        self.gather = gather

    def forward(self, views: Sequence[Tensor], labels: Tensor | None = None) -> Tensor:
        z1, z2 = self.expander(self.encoder(torch.cat([views[0], views[1]]))).chunk(2)
        return vicreg_loss(
            z1,
            z2,
            self.sim_coeff,
            self.std_coeff,
            self.cov_coeff,
            gather=self.gather,
        )

    def after_step(self, step: int, total_steps: int) -> None:
        pass

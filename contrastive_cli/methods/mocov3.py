"""MoCo v3 (Chen, Xie & He, 2021): a base encoder with projector and predictor against a
momentum encoder with projector; symmetric InfoNCE over the global batch, no queue."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from contrastive_cli.distributed import Gather, all_gather
from contrastive_cli.losses.mocov3 import mocov3_loss
from contrastive_cli.methods import check_settings, projector_and_predictor
from contrastive_cli.methods.momentum import cosine_momentum, frozen_copy, update_momentum
from contrastive_cli.schema import Positive, PositiveInt, Probability


class MoCoV3(nn.Module):
    """Queries q = predictor(projector(encoder(x))), keys k = the momentum copies'
    projector(encoder(x)); loss ctr(q1, k2) + ctr(q2, k1) (``losses.mocov3``). Each view goes
    through the networks on its own, as the authors' code, so BatchNorm sees one view's batch.

    After the k-th optimizer step the momentum encoder and projector move towards the base
    ones with m = 1 - (1 - base) (cos(pi k / total) + 1) / 2, from ``base_momentum`` to 1:
    the authors update at the start of the next step with the schedule's value at its
    iteration, which is this. The schedule reads the loop's (step, total_steps), so a resumed
    run continues it exactly; the momentum copies are submodules, in the checkpoint.

    Any encoder works. The paper's ViT recipe (3-layer projector, the predictor's output
    BatchNorm, AdamW, a random patch embedding that is never trained) is
    ``+experiment=mocov3_vit``; the frozen patch embedding is the encoder's setting
    (``encoder.freeze_patch_embed``, ``models.patch_embed``), as it concerns the network.
    """

    def __init__(
        self,
        encoder: nn.Module,
        projector: Callable[[int], nn.Module],
        predictor: Callable[[int], nn.Module],
        projection_dim: PositiveInt = 256,
        temperature: Positive = 0.2,
        base_momentum: Probability = 0.99,
        gather: Gather = all_gather,  # the identity in one process
    ):
        super().__init__()
        check_settings(MoCoV3, temperature=temperature, base_momentum=base_momentum)
        self.encoder = encoder
        self.projector, self.predictor = projector_and_predictor(
            encoder, projector, predictor, projection_dim
        )
        self.momentum_encoder = frozen_copy(encoder)
        self.momentum_projector = frozen_copy(self.projector)
        self.temperature = temperature
        self.base_momentum = base_momentum
        self.gather = gather

    def forward(self, views: Sequence[Tensor], labels: Tensor | None = None) -> Tensor:
        q1, q2 = (self.predictor(self.projector(self.encoder(v))) for v in views[:2])
        with torch.no_grad():
            k1, k2 = (self.momentum_projector(self.momentum_encoder(v)) for v in views[:2])
        return mocov3_loss(q1, q2, k1, k2, self.temperature, self.gather)

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        m = cosine_momentum(step, total_steps, self.base_momentum)
        update_momentum(self.encoder, self.momentum_encoder, m)
        update_momentum(self.projector, self.momentum_projector, m)

"""NNCLR: nearest-neighbour contrastive learning (Dwibedi et al., 2021)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from contrastive_cli.distributed import Gather, all_gather
from contrastive_cli.losses.nnclr import nnclr_loss
from contrastive_cli.methods import check_settings, projector_and_predictor
from contrastive_cli.methods.moco import KeyQueue
from contrastive_cli.schema import Positive, PositiveInt


class NNCLR(nn.Module):
    """Encoder -> projector (z) -> predictor (p). Each view's nearest neighbour among past
    projections (the support set, a FIFO queue) is the positive of the other view's
    prediction, the other images' predictions the negatives (``losses.nnclr``). After each
    optimizer step the first view's projections of the global batch (every process's, in
    rank order) enter the queue, as the paper's ``update_queue(Q, z1)``.

    The queue starts as random unit vectors (as solo-learn's and lightly's), so the first
    ``queue_size / batch_size`` steps' neighbours are partly random; it is a buffer, so
    checkpoints carry it and a resumed run continues exactly.
    """

    def __init__(
        self,
        encoder: nn.Module,
        projector: Callable[[int], nn.Module],
        predictor: Callable[[int], nn.Module],
        projection_dim: PositiveInt = 256,
        queue_size: PositiveInt = 4096,
        temperature: Positive = 0.1,
        gather: Gather = all_gather,  # the identity in one process
    ):
        super().__init__()
        check_settings(NNCLR, temperature=temperature, queue_size=queue_size)
        self.encoder = encoder
        self.projector, self.predictor = projector_and_predictor(
            encoder, projector, predictor, projection_dim
        )
        self.queue = KeyQueue(queue_size, projection_dim)  # the support set (Q, D)
        self.temperature = temperature
        self.gather = gather
        self._z1: Tensor | None = None

    def forward(self, views: Sequence[Tensor], labels: Tensor | None = None) -> Tensor:
        z = self.projector(self.encoder(torch.cat([views[0], views[1]])))  # (2N, D)
        p1, p2 = self.predictor(z).chunk(2)
        z1, z2 = z.chunk(2)
        self._z1 = z1.detach()
        return nnclr_loss(z1, z2, p1, p2, self.queue.keys, self.temperature, self.gather)

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        if self._z1 is not None:
            self.queue.push(self.gather(self._z1)[0])
            self._z1 = None

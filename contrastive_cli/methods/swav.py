"""SwAV: swapping assignments between views (Caron et al., 2020). Each crop's scores against
learnt prototypes predict the Sinkhorn codes of the other crops."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from contrastive_cli.distributed import Gather, all_gather
from contrastive_cli.losses.precision import full_precision, upcast
from contrastive_cli.losses.swav import sinkhorn, swav_loss
from contrastive_cli.models.heads import Prototypes
from contrastive_cli.schema import Count, Positive, PositiveInt


class SwAV(nn.Module):
    """encoder -> projector -> L2-normalised z -> scores z . c_k against K unit prototypes
    (``heads.Prototypes``, the paper's normalised linear layer). Codes: Sinkhorn-Knopp on the
    2 global crops' scores of the whole global batch (every process's rows, gathered, so
    every process computes the same codes; the sums the authors all-reduce are these sums),
    with the queue's rows in front once it is in use; each process keeps its own rows.
    Every crop (2 global, then ``data.augment.local_crops`` local ones) predicts the codes of
    the global crops it is not (``losses.swav``).

    The queue (small batches, paper section 4.1): from epoch ``queue_start_epoch`` the global
    batch's embeddings of each global crop enter a FIFO of ``queue_size`` rows per crop after
    every optimizer step; once full, its rows, scored against the current prototypes, join
    the batch in Sinkhorn (as the authors' code). The queue holds every process's rows in
    rank order, the same on every process, so a checkpoint holds no rank-dependent state.

    Prototypes frozen for the first ``freeze_prototypes_epochs`` epochs (the authors' code
    freezes them for the first iterations): their gradient is zero (not absent, so DDP sees
    every parameter used and the optimizer's update leaves their directions unchanged).

    The epoch comes from the method's own step clock, a buffer: (optimizer steps taken, steps
    per epoch). Steps per epoch is set once, at the first step, as total_steps // ``epochs``
    (the config passes ``trainer.epochs``), so checkpoints carry it and a resumed run reads
    the same epochs. No change to the training loop is needed.
    """

    uses_local_crops = True  # read by validate: the other methods refuse local crops

    def __init__(
        self,
        encoder: nn.Module,
        projector: Callable[[int], nn.Module],
        epochs: PositiveInt,
        projection_dim: PositiveInt = 128,
        prototypes: PositiveInt = 3000,
        temperature: Positive = 0.1,
        epsilon: Positive = 0.05,
        sinkhorn_iterations: PositiveInt = 3,
        queue_size: Count = 3840,
        queue_start_epoch: Count = 15,
        freeze_prototypes_epochs: Count = 1,
        gather: Gather = all_gather,  # the identity in one process
    ):
        super().__init__()
        for name, value in (("temperature", temperature), ("epsilon", epsilon)):
            if value <= 0:
                raise ValueError(f"loss.{name} must be > 0, got {value}")
        for name, value in (
            ("epochs", epochs),
            ("prototypes", prototypes),
            ("sinkhorn_iterations", sinkhorn_iterations),
        ):
            if value < 1:
                raise ValueError(f"loss.{name} must be >= 1, got {value}")
        for name, value in (
            ("queue_size", queue_size),
            ("queue_start_epoch", queue_start_epoch),
            ("freeze_prototypes_epochs", freeze_prototypes_epochs),
        ):
            if value < 0:
                raise ValueError(f"loss.{name} must be >= 0, got {value}")
        self.encoder = encoder
        self.projector = projector(encoder.out_dim)
        self.prototypes = Prototypes(projection_dim, prototypes)
        # One FIFO of past embeddings per global crop, oldest overwritten first.
        self.register_buffer("queue", torch.zeros(2, queue_size, projection_dim))  # (2, L, D)
        self.register_buffer("queue_rows", torch.zeros(2, dtype=torch.long))  # (filled, next)
        # (optimizer steps taken, steps per epoch; 0 until the first step): the epoch clock.
        self.register_buffer("clock", torch.zeros(2, dtype=torch.long))
        self.epochs = epochs
        self.temperature = temperature
        self.epsilon = epsilon
        self.sinkhorn_iterations = sinkhorn_iterations
        self.queue_start_epoch = queue_start_epoch
        self.freeze_prototypes_epochs = freeze_prototypes_epochs
        self.gather = gather
        self._embeddings: Tensor | None = None
        # (steps, per epoch, queue rows filled, next queue row): the buffers, read once
        self._clock: tuple[int, int, int, int] | None = None
        self.register_load_state_dict_post_hook(_forget_clock)

    def _read_clock(self) -> tuple[int, int, int, int]:
        """The clock and the queue's place, read from the buffers once (not synced every step)."""
        if self._clock is None:
            steps, per_epoch = self.clock.tolist()
            filled, start = self.queue_rows.tolist()
            self._clock = (steps, per_epoch, filled, start)
        return self._clock

    def epoch(self) -> int:
        """The epoch of the next step (0-based)."""
        steps, per_epoch, _, _ = self._read_clock()
        return steps // per_epoch if per_epoch else 0

    def forward(self, views: Sequence[Tensor], labels: Tensor | None = None) -> Tensor:
        n = views[0].shape[0]
        projections = list(self.projector(self.encoder(torch.cat(views[:2]))).chunk(2))
        if len(views) > 2:  # local crops: smaller, so one more pass through the encoder
            local = self.projector(self.encoder(torch.cat(views[2:])))
            projections += list(local.chunk(len(views) - 2))
        epoch = self.epoch()
        # Scores in float32, as the losses (``losses.precision``): under bf16 autocast the
        # cosines near 1 would be 0.004 apart, x 1/T = 10 in the logits and 1/eps in Sinkhorn.
        with full_precision(projections[0]):
            z = [F.normalize(upcast(x), dim=1) for x in projections]  # V x (N, D), unit rows
            weight = F.normalize(upcast(self.prototypes.weight), dim=1)  # (K, D) unit prototypes
            if epoch < self.freeze_prototypes_epochs:
                weight = weight.detach() + weight * 0  # a zero gradient: frozen
            scores = [upcast(x) @ weight.T for x in z]  # V x (N, K)
        use_queue = (
            self.queue.shape[1] > 0
            and epoch >= self.queue_start_epoch
            and self._read_clock()[2] >= self.queue.shape[1]
        )
        codes = []
        with torch.no_grad(), full_precision(weight):
            for i in range(2):
                rows, offset = self.gather(scores[i].detach())  # (M, K): the global batch
                if use_queue:
                    queued = self.queue[i].to(weight.dtype) @ weight.detach().T  # (L, K)
                    rows, offset = torch.cat([queued, rows]), offset + queued.shape[0]
                q = sinkhorn(rows, self.epsilon, self.sinkhorn_iterations)
                codes.append(q[offset : offset + n])
        self._embeddings = torch.stack([z[0].detach(), z[1].detach()])  # (2, N, D)
        return swav_loss(scores, codes, self.temperature)

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        _, per_epoch, filled, start = self._read_clock()
        if per_epoch == 0:  # the first step: steps per epoch, once
            per_epoch = max(total_steps // self.epochs, 1)
        size = self.queue.shape[1]
        if (
            self._embeddings is not None
            and size > 0
            and (step - 1) // per_epoch >= self.queue_start_epoch
        ):
            new = torch.stack([self.gather(e)[0] for e in self._embeddings])[:, -size:]  # (2, M, D)
            rows = (start + torch.arange(new.shape[1], device=new.device)) % size
            self.queue[:, rows] = new.to(self.queue.dtype)
            filled, start = min(filled + new.shape[1], size), (start + new.shape[1]) % size
            self.queue_rows.copy_(torch.tensor([filled, start]))
        self._embeddings = None
        self.clock.copy_(torch.tensor([step, per_epoch]))
        self._clock = (step, per_epoch, filled, start)


def _forget_clock(module: nn.Module, incompatible_keys: object) -> None:
    """After a checkpoint is loaded, read the clock anew."""
    module._clock = None  # type: ignore[assignment]

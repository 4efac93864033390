"""MoCo v2: query encoder+projector, an EMA key copy, and a FIFO queue of past keys."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from contrastive_cli.distributed import Gather, all_gather, global_rows
from contrastive_cli.losses.moco import moco_infonce
from contrastive_cli.methods.momentum import frozen_copy, update_momentum
from contrastive_cli.schema import Momentum, Positive, PositiveInt


class KeyQueue(nn.Module):
    """A fixed-size FIFO of L2-normalised keys, in buffers so checkpoints carry it.

    ``push`` overwrites the oldest rows, wrapping around the end; any batch size works.
    """

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.register_buffer("keys", F.normalize(torch.randn(size, dim), dim=1))  # (K, D)
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def push(self, k: Tensor) -> None:
        size = self.keys.shape[0]
        k = k.detach()[-size:]  # a batch larger than K keeps its newest K
        rows = (self.ptr + torch.arange(k.shape[0], device=k.device)) % size
        self.keys[rows] = F.normalize(k, dim=1).to(self.keys.dtype)
        self.ptr.copy_((self.ptr + k.shape[0]) % size)


class MoCo(nn.Module):
    def __init__(
        self,
        encoder: nn.Module,
        projector: Callable[[int], nn.Module],
        temperature: Positive = 0.2,
        queue_size: PositiveInt = 4096,
        momentum: Momentum = 0.99,
        out_dim: PositiveInt = 128,
        key_bn_splits: PositiveInt = 4,
        symmetric: bool = False,
        gather: Gather = all_gather,  # the identity in one process
    ):
        super().__init__()
        self.encoder = encoder
        self.projector = projector(encoder.out_dim)
        self.key_encoder = frozen_copy(encoder)
        self.key_projector = frozen_copy(self.projector)
        self.queue = KeyQueue(queue_size, out_dim)
        self.temperature = temperature
        self.momentum = momentum
        self.key_bn_splits = key_bn_splits
        self.symmetric = symmetric
        self.gather = gather
        self._keys: Tensor | None = None

    @torch.no_grad()
    def _keys_of(self, view: Tensor) -> Tensor:
        """Keys computed in ``key_bn_splits`` interleaved groups of the global batch.

        On one device the queries' BatchNorm statistics would otherwise equal the keys',
        which lets the model tell the current batch's keys from the queue's (the reason
        for MoCo's shuffle-BN). Groups of every ``splits``-th sample break that link
        without randomness. The groups are those of the global batch (sample ``g`` of it is
        in group ``g % splits``) and every process runs every group, possibly empty here,
        so that BatchNorm synchronised over the processes sees exactly the group one
        process would: N processes compute the same keys as one, at any batch size.
        """
        offset, total = global_rows(view.shape[0])
        splits = max(1, min(self.key_bn_splits, total // 2))
        groups = [
            torch.arange((i - offset) % splits, view.shape[0], splits, device=view.device)
            for i in range(splits)
        ]
        order = torch.cat(groups)
        chunks = view[order].split([len(g) for g in groups])
        keys = torch.cat([self.key_projector(self.key_encoder(chunk)) for chunk in chunks])
        return torch.empty_like(keys).index_copy_(0, order, keys)

    def forward(self, views: Sequence[Tensor], labels: Tensor | None = None) -> Tensor:
        view1, view2 = views[0], views[1]
        queue = self.queue.keys.clone()  # read before this batch's keys go in
        q1 = self.projector(self.encoder(view1))
        k2 = self._keys_of(view2)
        loss = moco_infonce(q1, k2, queue, self.temperature)
        keys = k2
        if self.symmetric:
            q2 = self.projector(self.encoder(view2))
            k1 = self._keys_of(view1)
            loss = (loss + moco_infonce(q2, k1, queue, self.temperature)) / 2
            keys = torch.cat([k2, k1])
        self._keys = keys
        return loss

    @torch.no_grad()
    def after_step(self, step: int, total_steps: int) -> None:
        update_momentum(self.encoder, self.key_encoder, self.momentum)
        update_momentum(self.projector, self.key_projector, self.momentum)
        if self._keys is not None:
            self.queue.push(self.gather(self._keys)[0])
            self._keys = None

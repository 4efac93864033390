"""Methods wire an encoder, heads, momentum copies and a loss together.

Every method is an ``nn.Module`` with the same small surface, so the training loop never
needs to know which one it runs:

- ``encoder``: the network that is evaluated and exported;
- ``forward(views, labels) -> loss``: one training step's loss from the step's views
  (two global views, then any local crops: ``data.augment.local_crops``);
- ``after_step(step, total_steps)``: state updates after the optimizer step (EMA, queue).

State (momentum copies, the queue) lives in buffers and submodules, so it is saved in
checkpoints and follows ``.to(device)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from torch import Tensor, nn


class Method(Protocol):
    encoder: nn.Module

    def __call__(self, views: Sequence[Tensor], labels: Tensor | None) -> Tensor: ...

    def after_step(self, step: int, total_steps: int) -> None: ...

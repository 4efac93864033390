"""Methods wire an encoder, heads, momentum copies and a loss together.

Every method is an ``nn.Module`` with the same small surface, so the training loop never
needs to know which one it runs:

- ``encoder``: the network that is evaluated and exported;
- ``forward(views, labels) -> loss``: one training step's loss from the step's views
  (two global views, then any local crops: ``data.augment.local_crops``);
- ``after_step(step, total_steps)``: state updates after the optimizer step (EMA, queue).

Two optional class attributes tell the checks what a method needs, so no check names a
method:

- ``uses_local_crops = True``: the method trains on local crops (DINO); any other method
  given ``data.augment.local_crops > 0`` is refused before training (``validate``);
- ``needs_labels = True``: the method trains on labels (SupCon); unlabelled training data is
  refused once loaded (``validate.check_data``). Methods whose need depends on a setting
  (``loss.positives=labels`` for triplet and contrastive) are checked on that setting.

State (momentum copies, the queue, DINO's centre) lives in buffers and submodules, so it is
saved in checkpoints and follows ``.to(device)``. Methods whose loss compares samples across
the batch take ``gather`` (``contrastive_cli.distributed``) and pass it to the loss.

A new method is three files: its loss (``losses/<name>.py``), its module here, and
``conf/loss/<name>.yaml``; tests, ``contrast --help`` and the benchmarks find it there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal, Protocol

import torch
from torch import Tensor, nn

from contrastive_cli.schema import parameters, problem

if TYPE_CHECKING:
    from contrastive_cli.distributed import Gather

Positives = Literal["views", "labels"]


class Method(Protocol):
    encoder: nn.Module

    def __call__(self, views: Sequence[Tensor], labels: Tensor | None) -> Tensor: ...

    def after_step(self, step: int, total_steps: int) -> None: ...


def positive_ids(
    positives: Positives, view: Tensor, labels: Tensor | None, gather: Gather
) -> Tensor:
    """Who is whose positive, for the samples of this process's ``view``: their labels
    (``positives=labels``), or an id per image that is unique across processes (this
    process's offset in the global batch added), so that two ranks' images with the same
    local index are not each other's positives (``positives=views``)."""
    if positives == "labels":
        if labels is None:
            raise ValueError("loss.positives=labels needs labelled training data")
        return labels
    ids = torch.arange(view.shape[0], device=view.device)
    return ids + gather(ids)[1]


def check_settings(method: Callable[..., Any], **values: Any) -> None:
    """Refuse each value that its annotation in ``method``'s signature does not allow, as
    ``loss.NAME must be WHAT, got VALUE``. The config is checked against the same annotations
    before anything is built (``schema``); this is the same check for code that builds a
    method directly."""
    types = parameters(method) or {}
    for name, value in values.items():
        allowed = problem(value, types[name])
        if allowed is not None:
            raise ValueError(f"loss.{name} must be {allowed}, got {value}")


def projector_and_predictor(
    encoder: nn.Module,
    projector: Callable[[int], nn.Module],
    predictor: Callable[[int], nn.Module],
    projection_dim: int,
) -> tuple[nn.Module, nn.Module]:
    """The heads of a method that predicts: the projector on the encoder's features
    (``encoder.out_dim``), the predictor on the projections (``projection_dim``, which the
    configs tie to the projector's output width)."""
    return projector(encoder.out_dim), predictor(projection_dim)

"""Fine-tuning (``eval.finetune.enabled=true``, ``contrast eval RUN --finetune``): the encoder
and a linear head trained end to end on the labelled train split, with the run's training
augmentation (one view per image), cross-entropy and Adam.

- Images: the train split, or a fixed subset of ``eval.finetune.max_images`` of it.
- The learning rate: each of ``eval.finetune.lrs`` is fine-tuned on the images less a fixed
  held-out ``val_fraction`` and scored on that held-out part; the best is refitted on all
  of them. The test split is predicted once, at the end; it chooses nothing.
- ``finetune_top1``: from the trained encoder; ``finetune_scratch_top1``: the same recipe from
  the encoder as initialised (the supervised baseline), so the gain from pretraining shows.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from contrastive_cli.data.batches import derive_seed

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class FinetuneSettings:
    epochs: int
    lrs: tuple[float, ...]
    val_fraction: float
    batch_size: int
    max_images: int | None

    @staticmethod
    def of(node: dict[str, Any]) -> FinetuneSettings:
        return FinetuneSettings(
            int(node["epochs"]),
            tuple(float(v) for v in node["lrs"]),
            float(node["val_fraction"]),
            int(node["batch_size"]),
            None if node.get("max_images") is None else int(node["max_images"]),
        )


class Classifier(nn.Module):
    def __init__(self, encoder: nn.Module, num_classes: int):
        super().__init__()
        self.encoder, self.head = encoder, nn.Linear(encoder.out_dim, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x))


def train_classifier(
    encoder: nn.Module,
    images: Tensor,
    labels: Tensor,
    num_classes: int,
    lr: float,
    s: FinetuneSettings,
    augment: Any,
    device: torch.device,
    seed: int,
) -> Classifier:
    """A copy of ``encoder`` with a linear head, trained ``s.epochs`` epochs end to end."""
    model = Classifier(copy.deepcopy(encoder), num_classes).to(device).train()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(derive_seed(seed, "finetune-order"))
    views = torch.Generator(device=device).manual_seed(derive_seed(seed, "finetune-augment"))
    for _ in range(s.epochs):
        order = torch.randperm(len(images), generator=g)
        for start in range(0, len(images), s.batch_size):
            idx = order[start : start + s.batch_size]
            if len(idx) < 2:  # BatchNorm needs two images
                continue
            x = augment(images[idx].to(device), views)
            loss = F.cross_entropy(model(x), labels[idx].to(device))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return model.eval()


@torch.no_grad()
def accuracy_of(
    model: nn.Module, images: Tensor, labels: Tensor, augment: Any, device: torch.device
) -> float:
    correct = 0
    for start in range(0, len(images), 1024):
        x = augment.normalize(images[start : start + 1024].to(device))
        correct += int((model(x).argmax(1).cpu() == labels[start : start + 1024]).sum())
    return correct / max(len(images), 1)


def finetune(
    encoder: nn.Module,
    train: tuple[Tensor, Tensor],
    test: tuple[Tensor, Tensor],
    num_classes: int,
    augment: Any,
    device: torch.device,
    s: FinetuneSettings,
    seed: int,
) -> tuple[float, float]:
    """(test top-1, the learning rate chosen on the held-out part of ``train``)."""
    images, labels = train
    g = torch.Generator().manual_seed(derive_seed(seed, "finetune-subset"))
    order = torch.randperm(len(images), generator=g)
    if s.max_images is not None:
        order = order[: s.max_images]
    n_val = max(1, round(len(order) * s.val_fraction))
    val, fit = order[:n_val], order[n_val:]
    scores = {}
    for lr in s.lrs:
        model = train_classifier(
            encoder, images[fit], labels[fit], num_classes, lr, s, augment, device, seed
        )
        scores[lr] = accuracy_of(model, images[val], labels[val], augment, device)
    best = max(s.lrs, key=lambda lr: scores[lr])  # ties: the first listed
    model = train_classifier(
        encoder, images[order], labels[order], num_classes, best, s, augment, device, seed
    )
    return accuracy_of(model, *test, augment, device), best


def finetune_metrics(
    encoder: nn.Module,
    random_init: Callable[[], nn.Module],
    data: Any,
    augment: Any,
    device: torch.device,
    node: dict[str, Any],
    seed: int,
) -> dict[str, float]:
    """``finetune_top1`` and ``finetune_scratch_top1`` (with their chosen ``_lr``)."""
    s = FinetuneSettings.of(node)
    train = (data.train.images, data.train.labels)
    test = (data.test.images, data.test.labels)
    metrics = {}
    for key, start in (("finetune", encoder), ("finetune_scratch", random_init())):
        log.info(f"fine-tuning ({key}): {s.epochs} epochs x {len(s.lrs)} learning rates + refit")
        top1, lr = finetune(start, train, test, data.num_classes, augment, device, s, seed)
        metrics[f"{key}_top1"], metrics[f"{key}_lr"] = top1, lr
    return metrics

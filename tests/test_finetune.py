"""Fine-tuning: the learning rate is chosen on a held-out part of train, never on test."""

from __future__ import annotations

import torch
from torch import nn

import contrastive_cli.finetune as ft
from contrastive_cli.data.augment import Augment
from contrastive_cli.finetune import FinetuneSettings, finetune

SETTINGS = FinetuneSettings(
    epochs=2, lrs=(1e-4, 1e-2), val_fraction=0.25, batch_size=16, max_images=None
)


def images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 2
    x = torch.randint(0, 100, (n, 1, 8, 8), generator=g, dtype=torch.uint8)
    return x + (120 * labels).view(-1, 1, 1, 1).to(torch.uint8), labels


def encoder() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 6))
    net.out_dim = 6  # type: ignore[assignment]
    return net


def augment() -> Augment:
    return Augment(mean=[0.5], std=[0.25], jitter_p=0.0, grayscale_p=0.0, crop_scale=(0.8, 1.0))


def test_the_learning_rate_is_chosen_without_the_test_split(monkeypatch):
    train = images(64, 0)
    scored = []
    real = ft.accuracy_of

    def spy(model, x, y, aug, device):
        scored.append(x)
        return real(model, x, y, aug, device)

    monkeypatch.setattr(ft, "accuracy_of", spy)
    device = torch.device("cpu")
    top1, lr = finetune(encoder(), train, images(40, 1), 2, augment(), device, SETTINGS, seed=0)
    # one score per learning rate on held-out train images, then the test split once
    assert len(scored) == 3 and all(len(x) == 16 for x in scored[:2])
    train_rows = {tuple(r.flatten().tolist()) for r in train[0]}
    assert all(tuple(r.flatten().tolist()) in train_rows for x in scored[:2] for r in x)
    assert len(scored[2]) == 40
    # a different test split (wrong labels even) changes the score, never the choice
    bad_x, bad_y = images(40, 2)
    other_top1, other_lr = finetune(
        encoder(), train, (bad_x, 1 - bad_y), 2, augment(), device, SETTINGS, seed=0
    )
    assert other_lr == lr and lr in SETTINGS.lrs and other_top1 != top1
    assert 0.0 <= top1 <= 1.0

"""The training loop: built objects in, trained method out. Reads top to bottom."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from tqdm import tqdm

from contrastive_cli.data.augment import Augment
from contrastive_cli.data.batches import Batches, derive_seed
from contrastive_cli.device import Runtime


@dataclass
class Progress:
    """Where training stands. Plain types only: it is saved in every checkpoint."""

    epoch: int = 0                      # completed epochs
    step: int = 0                       # optimizer steps taken
    batch: int = 0                      # batches done in the unfinished epoch
    step_losses: list[float] = field(default_factory=list)  # that epoch's losses so far
    epoch_seconds: float = 0.0          # that epoch's training time so far
    train_seconds: float = 0.0          # all completed epochs' training time


def epoch_record(progress: Progress, steps_per_epoch: int, batch_size: int, lr: float) -> dict:
    """The metrics.jsonl line of the epoch that just ended (mean loss in float64)."""
    loss = torch.tensor(progress.step_losses, dtype=torch.float64).mean().item()
    return {
        "epoch": progress.epoch,
        "step": progress.step,
        "loss": loss,
        "lr": lr,
        "images_per_s": steps_per_epoch * batch_size / max(progress.epoch_seconds, 1e-9),
        "epoch_time_s": progress.epoch_seconds,
    }


def train(
    method: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    batches: Batches,
    augment: Augment,
    runtime: Runtime,
    epochs: int,
    seed: int,
    progress: Progress,
    end_epoch: Callable[[Progress, dict], None],
    log_every: int = 10,
) -> Progress:
    """Train ``method`` from ``progress`` to ``epochs``; ``end_epoch`` logs and checkpoints."""
    total_steps = epochs * len(batches)
    generator = torch.Generator(device=runtime.device)
    autocast = (
        torch.autocast(runtime.device.type, dtype=torch.bfloat16) if runtime.autocast else contextlib.nullcontext()
    )
    for epoch in range(progress.epoch, epochs):
        method.train()
        losses: list[Tensor] = []
        bar = tqdm(total=len(batches), initial=progress.batch, desc=f"epoch {epoch + 1}/{epochs}",
                   leave=False, disable=None, dynamic_ncols=True)
        start = time.perf_counter()
        for images, labels in batches.epoch(epoch, start=progress.batch):
            # 1. two views, augmented on the device with parameters seeded by (seed, step)
            generator.manual_seed(derive_seed(seed, "augment", progress.step))
            view1, view2 = augment(images, generator), augment(images, generator)
            if runtime.channels_last:
                view1 = view1.contiguous(memory_format=torch.channels_last)
                view2 = view2.contiguous(memory_format=torch.channels_last)
            # 2. loss, backward, optimizer and schedule step
            with autocast:
                loss = method(view1, view2, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            progress.step += 1
            progress.batch += 1
            # 3. method state after the step: EMA targets, queue
            method.after_step(progress.step, total_steps)
            losses.append(loss.detach())
            # 4. progress bar; the only host sync in the loop, every `log_every` steps
            bar.update()
            if progress.batch % log_every == 0:
                seconds = progress.epoch_seconds + time.perf_counter() - start
                rate = (progress.batch * batches.batch_size) / max(seconds, 1e-9)
                bar.set_postfix(loss=f"{losses[-1].item():.4f}", img_s=f"{rate:,.0f}")
        bar.close()
        progress.step_losses += torch.stack(losses).float().tolist() if losses else []
        progress.epoch_seconds += time.perf_counter() - start
        progress.epoch += 1
        record = epoch_record(progress, len(batches), batches.batch_size, scheduler.get_last_lr()[0])
        progress.train_seconds += progress.epoch_seconds
        progress.batch, progress.step_losses, progress.epoch_seconds = 0, [], 0.0
        end_epoch(progress, record)
    return progress

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
from contrastive_cli.errors import Diverged


@dataclass
class Progress:
    """Where training stands. Plain types only: it is saved in every checkpoint."""

    epoch: int = 0  # completed epochs
    step: int = 0  # optimizer steps taken
    batch: int = 0  # batches done in the unfinished epoch
    step_losses: list[float] = field(default_factory=list)  # that epoch's losses so far
    epoch_seconds: float = 0.0  # that epoch's training time so far
    train_seconds: float = 0.0  # all completed epochs' training time


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


@dataclass
class Hooks:
    """What the loop calls out to; run.py supplies them."""

    end_epoch: Callable[[Progress, dict], None]  # monitor, log, checkpoint
    save: Callable[[Progress], None]  # checkpoint mid-epoch (on a stop request)
    stop_requested: Callable[[], bool] = lambda: False
    interrupted: Callable[[Progress], BaseException] = lambda p: KeyboardInterrupt()
    # every `log_every` steps: (step, {"loss", "lr"}) for the trackers (never blocks)
    log_step: Callable[[int, dict[str, float]], None] = lambda step, values: None


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
    hooks: Hooks,
    log_every: int = 10,
    grad_clip: float = 0.0,
) -> Progress:
    """Train ``method`` from ``progress`` to ``epochs``.

    Raises ``Diverged`` (step not applied) on a non-finite loss or gradient, and
    ``hooks.interrupted(progress)`` after saving when ``hooks.stop_requested()``.
    """
    total_steps = epochs * len(batches)
    params = [p for p in method.parameters() if p.requires_grad]
    forward_state = ForwardState(method)
    generator = torch.Generator(device=runtime.device)
    autocast = (
        torch.autocast(runtime.device.type, dtype=torch.bfloat16)
        if runtime.autocast
        else contextlib.nullcontext()
    )
    for epoch in range(progress.epoch, epochs):
        method.train()
        losses: list[Tensor] = []
        bar = tqdm(
            total=len(batches),
            initial=progress.batch,
            desc=f"epoch {epoch + 1}/{epochs}",
            leave=False,
            disable=None,
            dynamic_ncols=True,
        )
        start = time.perf_counter()
        for images, labels in batches.epoch(epoch, start=progress.batch):
            # 1. two views, augmented on the device with parameters seeded by (seed, step)
            generator.manual_seed(derive_seed(seed, "augment", progress.step))
            view1, view2 = augment(images, generator), augment(images, generator)
            if runtime.channels_last:
                view1 = view1.contiguous(memory_format=torch.channels_last)
                view2 = view2.contiguous(memory_format=torch.channels_last)
            # 2. loss, backward, optimizer and schedule step
            forward_state.save()
            with autocast:
                loss = method(view1, view2, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
            # A non-finite step must never reach the weights: this check is one host sync
            # per step (free on CPU; on CUDA it waits for the backward pass).
            if not torch.isfinite(loss.detach() + grad_norm):
                forward_state.restore()
                raise Diverged(progress.step + 1, loss.item(), grad_norm.item())
            if grad_clip > 0:
                nn.utils.clip_grads_with_norm_(params, grad_clip, grad_norm)
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
                step_loss = losses[-1].item()
                bar.set_postfix(loss=f"{step_loss:.4f}", img_s=f"{rate:,.0f}")
                hooks.log_step(progress.step, {"loss": step_loss, "lr": scheduler.get_last_lr()[0]})
            if hooks.stop_requested():
                _bank(progress, losses, start)
                bar.close()
                hooks.save(progress)
                raise hooks.interrupted(progress)
        bar.close()
        _bank(progress, losses, start)
        progress.epoch += 1
        record = epoch_record(
            progress, len(batches), batches.batch_size, scheduler.get_last_lr()[0]
        )
        progress.train_seconds += progress.epoch_seconds
        progress.batch, progress.step_losses, progress.epoch_seconds = 0, [], 0.0
        hooks.end_epoch(progress, record)
    return progress


class ForwardState:
    """The buffers a forward pass changes (BatchNorm running statistics), copied before each
    step so that a rejected step leaves no trace. A few small copies per step."""

    def __init__(self, method: nn.Module):
        self.buffers = [
            b
            for m in method.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)
            for b in m.buffers()
        ]
        self.copies = [torch.empty_like(b) for b in self.buffers]

    def save(self) -> None:
        for copy, buffer in zip(self.copies, self.buffers, strict=True):
            copy.copy_(buffer)

    def restore(self) -> None:
        for copy, buffer in zip(self.copies, self.buffers, strict=True):
            buffer.copy_(copy)


def _bank(progress: Progress, losses: list[Tensor], start: float) -> None:
    """Move this session's step losses and time into ``progress`` (plain floats)."""
    progress.step_losses += torch.stack(losses).float().tolist() if losses else []
    progress.epoch_seconds += time.perf_counter() - start
    losses.clear()

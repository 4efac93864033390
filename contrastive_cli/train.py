"""The training loop: built objects in, trained method out. Reads top to bottom."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields

import torch
from torch import Tensor, nn
from tqdm import tqdm

from contrastive_cli.data.augment import Augment
from contrastive_cli.data.batches import Batches, derive_seed
from contrastive_cli.device import Runtime
from contrastive_cli.distributed import SINGLE, Dist, reduce_flags
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


def progress_from_state(state: object) -> Progress:
    """The Progress a checkpoint holds; ValueError when its fields are not what
    ``dataclasses.asdict(Progress)`` wrote (a checkpoint from elsewhere)."""
    if not isinstance(state, dict) or set(state) != {f.name for f in fields(Progress)}:
        raise ValueError("its progress record has other fields than contrast writes")
    ints = ("epoch", "step", "batch")
    floats = ("epoch_seconds", "train_seconds")
    if not all(
        isinstance(state[k], int) and not isinstance(state[k], bool) and state[k] >= 0 for k in ints
    ):
        raise ValueError("its progress counters are not non-negative integers")
    if not all(isinstance(state[k], (int, float)) for k in floats) or not (
        isinstance(state["step_losses"], list)
        and all(isinstance(v, (int, float)) for v in state["step_losses"])
    ):
        raise ValueError("its progress times or losses are not numbers")
    return Progress(**state)


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

    # monitor, log, checkpoint; may return a new total of epochs (trainer.time_budget)
    end_epoch: Callable[[Progress, dict], int | None]
    save: Callable[[Progress], None]  # checkpoint mid-epoch (on a stop request)
    stop_requested: Callable[[], bool] = lambda: False
    interrupted: Callable[[Progress], BaseException] = lambda p: KeyboardInterrupt()
    # every `log_every` steps: (step, {"loss", "lr"}) for the trackers (never blocks)
    log_step: Callable[[int, dict[str, float]], None] = lambda step, values: None


def train(
    method: nn.Module,
    forward: Callable[..., Tensor],
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
    dist: Dist = SINGLE,
) -> Progress:
    """Train ``method`` from ``progress`` to ``epochs``; ``forward`` computes its loss (the
    method itself, or it compiled and/or wrapped for several processes), while ``method``'s
    own ``after_step`` updates its state (EMA copies, queue) after each optimizer step.

    With several processes (``dist``), ``batches`` yields this process's share of each
    global batch, its views are augmented with the global batch's parameters, and one
    all-reduce per step agrees on the step's loss (the global mean), on whether any process
    saw a non-finite value, and on a stop request, so every process acts alike.

    Raises ``Diverged`` (step not applied) on a non-finite loss or gradient, and
    ``hooks.interrupted(progress)`` after saving when a stop was requested.
    """
    total_steps = epochs * len(batches)
    rows = (dist.shard(batches.batch_size)[0], batches.batch_size)
    params = [p for p in method.parameters() if p.requires_grad]
    forward_state = ForwardState(method)
    generator = torch.Generator(device=runtime.device)
    autocast = (
        torch.autocast(runtime.device.type, dtype=torch.bfloat16)
        if runtime.autocast
        else contextlib.nullcontext()
    )
    while progress.epoch < epochs:
        epoch = progress.epoch
        method.train()
        losses: list[Tensor] = []
        bar = tqdm(
            total=len(batches),
            initial=progress.batch,
            desc=f"epoch {epoch + 1}/{epochs}",
            leave=False,
            disable=None if dist.main else True,
            dynamic_ncols=True,
        )
        start = time.perf_counter()
        # The time of a run's very first step (compilation, warm-up), for time_budget.
        first_step_s: float | None = None
        timing_first_step = progress.step == 0
        for images, labels in batches.epoch(epoch, start=progress.batch):
            # 1. views, augmented on the device with parameters seeded by (seed, step)
            generator.manual_seed(derive_seed(seed, "augment", progress.step))
            views = augment.views(images, generator, rows)
            if runtime.channels_last:
                views = [v.contiguous(memory_format=torch.channels_last) for v in views]
            # 2. loss, backward, optimizer and schedule step
            forward_state.save()
            with autocast:
                loss = forward(views, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grad_norm = nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
            # A non-finite step must never reach the weights: this check is one host sync
            # per step (free on CPU; on CUDA it waits for the backward pass). With several
            # processes the same sync is one all-reduce of (loss, gradient norm, stop).
            loss, stop = _agree(loss.detach(), grad_norm, hooks.stop_requested, dist)
            if not torch.isfinite(loss + grad_norm):
                forward_state.restore()
                raise Diverged(progress.step + 1, loss.item(), grad_norm.item())
            if grad_clip > 0:
                nn.utils.clip_grads_with_norm_(params, grad_clip, grad_norm)
            optimizer.step()
            scheduler.step()
            progress.step += 1
            progress.batch += 1
            if timing_first_step:
                timing_first_step, first_step_s = False, time.perf_counter() - start
            # 3. method state after the step: EMA targets, queue
            method.after_step(progress.step, total_steps)
            losses.append(loss)
            # 4. progress bar; the only other host sync in the loop, every `log_every` steps
            bar.update()
            if progress.batch % log_every == 0 and dist.main:
                seconds = progress.epoch_seconds + time.perf_counter() - start
                rate = (progress.batch * batches.batch_size) / max(seconds, 1e-9)
                step_loss = losses[-1].item()
                bar.set_postfix(loss=f"{step_loss:.4f}", img_s=f"{rate:,.0f}")
                hooks.log_step(progress.step, {"loss": step_loss, "lr": scheduler.get_last_lr()[0]})
            if stop:
                _bank(progress, losses, start)
                bar.close()
                if dist.main:
                    hooks.save(progress)
                raise hooks.interrupted(progress)
        bar.close()
        _bank(progress, losses, start)
        progress.epoch += 1
        record = epoch_record(
            progress, len(batches), batches.batch_size, scheduler.get_last_lr()[0]
        )
        if first_step_s is not None:  # this epoch began the run
            record["first_step_s"] = first_step_s
        progress.train_seconds += progress.epoch_seconds
        progress.batch, progress.step_losses, progress.epoch_seconds = 0, [], 0.0
        epochs = hooks.end_epoch(progress, record) or epochs
        total_steps = epochs * len(batches)
    return progress


def _agree(
    loss: Tensor, grad_norm: Tensor, stop_requested: Callable[[], bool], dist: Dist
) -> tuple[Tensor, bool]:
    """(the step's loss, whether to stop after it), the same on every process: the mean of
    the processes' losses (a non-finite one makes it non-finite), and a stop if any asked."""
    if not dist.several:
        return loss, stop_requested()
    flags = torch.stack([loss.float(), torch.tensor(float(stop_requested()), device=loss.device)])
    flags = reduce_flags(flags)
    return flags[0] / dist.world_size, bool(flags[1] > 0)


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

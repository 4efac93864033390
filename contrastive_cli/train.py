"""The training loop: built objects in, trained method out. Reads top to bottom; everything
that is not the step itself hangs on the named events of ``contrastive_cli.events``."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from contrastive_cli.data.augment import Augment
from contrastive_cli.data.batches import Batches, derive_seed
from contrastive_cli.device import Runtime
from contrastive_cli.distributed import SINGLE, Dist, reduce_flags
from contrastive_cli.errors import Diverged
from contrastive_cli.events import Callback, Callbacks, Loop, Progress, StepEnd, progress_from_state

__all__ = ["Progress", "Training", "epoch_record", "progress_from_state", "train"]


class Training(NamedTuple):
    """What the loop trains, built by ``contrastive_cli.builder.build_training``."""

    method: nn.Module  # on the device; what checkpoints and exports hold
    step_fn: Callable[..., Tensor]  # its forward: the method, DDP-wrapped, compiled
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    batches: Batches


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
    training: Training,
    augment: Augment,
    runtime: Runtime,
    epochs: int,
    seed: int,
    progress: Progress,
    callbacks: Sequence[Callback] = (),
    grad_clip: float = 0.0,
    dist: Dist = SINGLE,
) -> Progress:
    """Train ``training.method`` from ``progress`` to ``epochs`` (which a callback may change
    after an epoch); ``training.step_fn`` computes its loss (the method itself, or it compiled
    and/or wrapped for several processes), while the method's own ``after_step`` updates its
    state (EMA copies, queue) after each optimizer step.

    With several processes (``dist``), the batches are this process's share of each global
    batch, its views are augmented with the global batch's parameters, and one all-reduce
    per step agrees on the step's loss (the global mean), on whether any process saw a
    non-finite value, and on a stop request, so every process acts alike.

    Raises ``Diverged`` (step not applied) on a non-finite loss or gradient. A stop request
    (a callback's ``wants_stop``) ends the epoch after its step with ``stop_requested``, whose
    callbacks save and raise; when none raises, training returns there.
    """
    events = Callbacks(callbacks)
    batches = training.batches
    loop = Loop(
        training.method,
        training.optimizer,
        training.scheduler,
        len(batches),
        batches.batch_size,
        epochs,
        progress,
        dist,
    )
    step = Step(training, augment, runtime, seed, grad_clip, dist)
    events.run_start(loop)
    try:
        while progress.epoch < loop.epochs:
            if not _epoch(loop, step, events):
                break
    except BaseException as e:
        events.run_end(loop, e)
        raise
    events.run_end(loop, None)
    return progress


def _epoch(loop: Loop, step: Step, events: Callbacks) -> bool:
    """One epoch from where ``loop.progress`` stands; False when a stop request ended it."""
    progress, batches = loop.progress, step.training.batches
    loop.method.train()
    losses: list[Tensor] = []
    events.epoch_start(loop)
    start = loop.epoch_started = time.perf_counter()
    # The time of a run's very first step (compilation, warm-up), for time_budget.
    first_step_s: float | None = None
    timing_first_step = progress.step == 0
    for images, labels in batches.epoch(progress.epoch, start=progress.batch):
        loss, stop = step(images, labels, progress.step, events.wants_stop)
        progress.step += 1
        progress.batch += 1
        if timing_first_step:
            timing_first_step, first_step_s = False, time.perf_counter() - start
        # method state after the step: EMA targets, queue
        loop.method.after_step(progress.step, loop.epochs * loop.steps_per_epoch)
        losses.append(loss)
        events.step_end(loop, StepEnd(loss))
        if stop:
            _bank(progress, losses, start)
            events.stop_requested(loop)
            return False
    _bank(progress, losses, start)
    progress.epoch += 1
    record = epoch_record(progress, len(batches), batches.batch_size, loop.lr)
    if first_step_s is not None:  # this epoch began the run
        record["first_step_s"] = first_step_s
    progress.train_seconds += progress.epoch_seconds
    progress.batch, progress.step_losses, progress.epoch_seconds = 0, [], 0.0
    events.epoch_end(loop, record)
    return True


class Step:
    """One optimizer step: views, loss, backward, the finiteness check, optimizer and
    schedule step. Holds what stays the same from step to step."""

    def __init__(
        self,
        training: Training,
        augment: Augment,
        runtime: Runtime,
        seed: int,
        grad_clip: float,
        dist: Dist,
    ):
        self.training, self.augment, self.runtime = training, augment, runtime
        self.seed, self.grad_clip, self.dist = seed, grad_clip, dist
        self.rows = (dist.shard(training.batches.batch_size)[0], training.batches.batch_size)
        self.params = [p for p in training.method.parameters() if p.requires_grad]
        self.forward_state = ForwardState(training.method)
        self.generator = torch.Generator(device=runtime.device)
        self.autocast = (
            (lambda: torch.autocast(runtime.device.type, dtype=torch.bfloat16))
            if runtime.autocast
            else contextlib.nullcontext
        )

    def __call__(
        self, images: Tensor, labels: Tensor | None, step: int, stop_requested: Callable[[], bool]
    ) -> tuple[Tensor, bool]:
        """(the step's loss, whether to stop after it); raises Diverged, step not applied."""
        optimizer, scheduler = self.training.optimizer, self.training.scheduler
        # 1. views, augmented on the device with parameters seeded by (seed, step)
        self.generator.manual_seed(derive_seed(self.seed, "augment", step))
        views = self.augment.views(images, self.generator, self.rows)
        if self.runtime.channels_last:
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        # 2. loss, backward, optimizer and schedule step
        self.forward_state.save()
        with self.autocast():
            loss = self.training.step_fn(views, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
        # A non-finite step must never reach the weights: this check is one host sync
        # per step (free on CPU; on CUDA it waits for the backward pass). With several
        # processes the same sync is one all-reduce of (loss, gradient norm, stop).
        loss, stop = _agree(loss.detach(), grad_norm, stop_requested, self.dist)
        if not torch.isfinite(loss + grad_norm):
            self.forward_state.restore()
            raise Diverged(step + 1, loss.item(), grad_norm.item())
        if self.grad_clip > 0:
            nn.utils.clip_grads_with_norm_(self.params, self.grad_clip, grad_norm)
        optimizer.step()
        scheduler.step()
        return loss, stop


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

"""Several processes (torch.distributed): the gather contract, global batch statistics,
and where a process learns its rank.

The gather contract. Losses take a ``gather`` function so that multi-process training can
hand them every process's embeddings without changing their signatures. ``gather(x)`` with
``x`` (N, D) this process's rows returns ((M, D) the rows of all processes in rank order,
the offset of this process's rows in them). Its backward pass SUMS, over all processes,
the gradient each one computed for a row and delivers it to the row's owner. DDP then
AVERAGES parameter gradients over the N processes. So:

- a per-sample loss over local anchors with gathered candidates (NT-Xent, SupCon, triplet),
  whose per-process value is the mean over local anchors: the mean over processes is the
  loss of the whole batch, and the gradient DDP applies is its gradient;
- a loss on global batch statistics (Barlow Twins, VICReg), computed in full, identically,
  by every process from gathered rows: the summed gradient is N times the loss's gradient
  and DDP's average divides it back, so nothing is divided by N twice (lightly #1920, #1980).

In one process the gather is the identity (``local_only``). ``all_reduce_sum`` has the
same backward rule for statistics (sums, counts) and serves BatchNorm over the global batch.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
import re
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.distributed as dist
from torch import Tensor, nn

from contrastive_cli.errors import ConfigError


class Gather(Protocol):
    def __call__(self, x: Tensor) -> tuple[Tensor, int]:
        """x: (N, D) local rows -> ((M, D) rows of all processes, offset of the local rows)."""
        ...


def local_only(x: Tensor) -> tuple[Tensor, int]:
    """The single-process gather: this process's rows are all there is."""
    return x, 0


def active() -> bool:
    """Whether this process is one of several in an initialised process group."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


class _AllGather(torch.autograd.Function):
    """Forward: every process's rows, concatenated. Backward: the gradient of each process's
    rows, summed over the processes, back to the owner (equal row counts everywhere)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        n = grad.shape[0] // dist.get_world_size()
        return grad[dist.get_rank() * n : (dist.get_rank() + 1) * n]


def all_gather(x: Tensor) -> tuple[Tensor, int]:
    """The gather of several processes (see the module docstring); the identity in one."""
    if not active():
        return x, 0
    if x.dtype.is_floating_point or x.dtype.is_complex:
        gathered = _AllGather.apply(x)
    else:  # ids and labels: no gradient
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        gathered = torch.cat(parts)
    return gathered, dist.get_rank() * x.shape[0]


def global_rows(rows: int) -> tuple[int, int]:
    """(offset of this process's ``rows`` in the global batch, the global batch's size):
    every process holds an equal slice (``Dist.shard``), in rank order; (0, rows) in one."""
    if not active():
        return 0, rows
    return dist.get_rank() * rows, dist.get_world_size() * rows


def global_mean(total: Tensor, count: Tensor, gather: Gather, processes: int) -> Tensor:
    """This process's share of a mean over every process's terms: its ``total`` divided by
    the ``count`` of terms summed over all processes, times the number of processes, so
    that the processes' mean (what DDP optimises) is sum(totals) / sum(counts). A plain
    local mean would weight each process's terms by its own count, which differs between
    processes whenever the number of terms does (same-class pairs, valid anchors)."""
    counts, _ = gather(count.reshape(1))
    return total * processes / counts.sum().clamp_min(1)


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:  # type: ignore[override]
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


def all_reduce_sum(x: Tensor) -> Tensor:
    """The sum of ``x`` over processes; its gradient is summed over processes too."""
    return _AllReduceSum.apply(x) if active() else x


class SyncBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose training statistics are those of the global batch, on any device
    (torch's own SyncBatchNorm runs on GPUs only; this one runs on CPUs with gloo too).

    Same parameters, buffers and state_dict keys as ``BatchNorm1d/2d``, so checkpoints and
    exported encoders do not depend on the number of processes. In one process, and in
    eval mode, it is exactly ``F.batch_norm``. Mean and variance are computed in two passes
    over the global batch (sums all-reduced with ``all_reduce_sum``), biased for
    normalising and unbiased for the running variance, as BatchNorm does.
    """

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and active()):
            return super().forward(x)
        dims = [d for d in range(x.dim()) if d != 1]
        shape = [1, -1] + [1] * (x.dim() - 2)
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x  # stats in fp32+
        count = torch.tensor([x.numel() // x.shape[1]], dtype=xf.dtype, device=x.device)
        total = all_reduce_sum(count)  # values per channel in the global batch
        mean = all_reduce_sum(xf.sum(dims)) / total
        centred = xf - mean.view(shape)
        var = all_reduce_sum(centred.square().sum(dims)) / total
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = (
                    self.momentum
                    if self.momentum is not None
                    else 1 / float(self.num_batches_tracked)
                )
                unbiased = var * total / (total - 1).clamp_min(1)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), m)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), m)
        y = centred * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def convert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """``module`` with every BatchNorm replaced by ``SyncBatchNorm`` (weights, buffers kept)."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(
        module, SyncBatchNorm
    ):
        like = next((t for t in module.state_dict().values() if t.is_floating_point()), None)
        synced = SyncBatchNorm(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
            device=like.device if like is not None else None,
            dtype=like.dtype if like is not None else None,
        )
        synced.load_state_dict(module.state_dict())
        if module.affine:
            synced.weight.requires_grad_(module.weight.requires_grad)
            synced.bias.requires_grad_(module.bias.requires_grad)
        synced.train(module.training)
        return synced
    for name, child in module.named_children():
        module.add_module(name, convert_sync_batchnorm(child))
    return module


# --------------------------------------------------------------------------- who am I
@dataclass(frozen=True)
class Place:
    """This process's place in a multi-process job."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list -> host names: ``gpu[01-03,07],cpu5`` ->
    ``gpu01 gpu02 gpu03 gpu07 cpu5`` (zero padding kept)."""
    hosts = []
    for prefix, ranges, plain in re.findall(r"([^,\[]+)\[([^\]]+)\]|([^,\[\]]+)", nodelist):
        if plain:
            hosts.append(plain)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            if not hi:
                hosts.append(prefix + lo)
                continue
            for n in range(int(lo), int(hi) + 1):
                hosts.append(f"{prefix}{n:0{len(lo)}d}")
    return hosts


def place_from_env(env: dict[str, str] | None = None) -> Place | None:
    """Where this process sits when something started several: torchrun / torch elastic
    (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) or SLURM tasks (SLURM_PROCID,
    SLURM_NTASKS, SLURM_LOCALID, SLURM_JOB_NODELIST, SLURM_JOB_ID: the first node is the
    rendezvous host and the port is derived from the job id). None in a single process."""
    env = dict(os.environ if env is None else env)

    def number(name: str, default: int, lo: int = 0, hi: int = 2**31 - 1) -> int:
        """An integer setting from the environment; one ConfigError line if it is not one."""
        text = env.get(name) or str(default)
        if not re.fullmatch(r"\s*\d{1,10}\s*", text) or not lo <= int(text) <= hi:
            raise ConfigError(
                f"{name}={text[:40]!r} (environment) is not allowed; allowed: an integer from "
                f"{lo} to {hi}"
            )
        return int(text)

    if number("WORLD_SIZE", 1, 1) > 1 and "RANK" in env:
        world = number("WORLD_SIZE", 1, 1)
        return Place(
            rank=number("RANK", 0, 0, world - 1),
            world_size=world,
            local_rank=number("LOCAL_RANK", 0, 0, world - 1),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=number("MASTER_PORT", 29500, 1, 65535),
        )
    if number("SLURM_NTASKS", 1, 1) > 1 and "SLURM_PROCID" in env:
        world = number("SLURM_NTASKS", 1, 1)
        nodes = expand_nodelist(env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST", ""))
        return Place(
            rank=number("SLURM_PROCID", 0, 0, world - 1),
            world_size=world,
            local_rank=number("SLURM_LOCALID", 0, 0, world - 1),
            master_addr=env.get("MASTER_ADDR") or (nodes[0] if nodes else "127.0.0.1"),
            master_port=number("MASTER_PORT", 15000 + number("SLURM_JOB_ID", 0) % 20000, 1, 65535),
        )
    return None


@dataclass(frozen=True)
class Dist:
    """What training needs to know about the processes: one (rank 0 of 1) or several."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def several(self) -> bool:
        return self.world_size > 1

    def shard(self, batch_size: int) -> tuple[int, int]:
        """(offset, rows) of this process's slice of every global batch."""
        if batch_size % self.world_size:
            raise ConfigError(
                f"trainer.batch_size={batch_size} is not allowed with {self.world_size} "
                f"processes; allowed: a multiple of {self.world_size} (the batch is global, "
                "each process takes an equal slice)"
            )
        rows = batch_size // self.world_size
        return self.rank * rows, rows


SINGLE = Dist()
TIMEOUT = datetime.timedelta(minutes=10)  # a collective that waits longer means a lost peer


def init_process_group(place: Place, device_type: str) -> Dist:
    """Join the process group (NCCL on CUDA, gloo elsewhere) at ``place``.

    The rendezvous store's keys are prefixed with the elastic restart count: a group that
    torch elastic restarts (``trainer.max_restarts``) may be handed the store of the failed
    attempt, whose stale addresses would otherwise make the new processes wait for peers
    that are gone."""
    if dist.is_initialized():
        return Dist(place.rank, place.world_size, place.local_rank)
    backend = "nccl" if device_type == "cuda" else "gloo"
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        place.master_addr,
        place.master_port,
        place.world_size,
        is_master=place.rank == 0 and not agent_store,
        timeout=TIMEOUT,
    )
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(
        backend,
        store=dist.PrefixStore(f"contrast/attempt_{attempt}", store),
        rank=place.rank,
        world_size=place.world_size,
        timeout=TIMEOUT,
    )
    return Dist(place.rank, place.world_size, place.local_rank)


def leave_process_group(clean: bool) -> None:
    """Leave the process group so that every process can exit cleanly (issue 23: rank 0 of a
    2-process run once died with SIGABRT, "terminate called without an active exception").

    ``clean``: every process got here without an error, so all of them reach a barrier
    first: no process tears its side down (rank 0: the rendezvous store's server thread)
    while another still has gloo traffic or store requests in flight. After an error there
    is no barrier (the others may never come; they stop on the lost connection instead).

    DistributedDataParallel sits in a reference cycle (its module's hooks point back at it),
    so it and its reducer are collected here, while the interpreter is whole, rather than
    at an arbitrary later collection or during shutdown. (Measured with torch 2.14: once a
    DDP wrapper was built, torch itself still references the group after
    ``destroy_process_group``, and its gloo and store threads run until the process exits;
    hence the barrier, so that the store's host exits only after everyone is done.)"""
    if not (dist.is_available() and dist.is_initialized()):
        return
    if clean and dist.get_world_size() > 1:
        with contextlib.suppress(Exception):
            dist.barrier()
    gc.collect()
    with contextlib.suppress(Exception):
        dist.destroy_process_group()
    gc.collect()


def reduce_flags(values: Tensor) -> Tensor:
    """The sum of ``values`` over processes (no gradient): losses, stop and error flags."""
    if active():
        values = values.clone()
        dist.all_reduce(values)
    return values

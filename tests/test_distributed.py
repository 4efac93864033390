"""Several processes compute what one process computes, on the global batch.

Real process groups: two processes on gloo (CPU), started here with
``torch.multiprocessing.spawn``, in the style of lightly's 2-process tests. Each test
compares them with one process given the whole global batch.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from contrastive_cli.config import build, compose, config_groups
from contrastive_cli.distributed import (
    Dist,
    SyncBatchNorm,
    all_gather,
    convert_sync_batchnorm,
    expand_nodelist,
    leave_process_group,
    place_from_env,
)
from tests.conftest import TINY

WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn, port: int, out: str, args: tuple) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD
    )
    clean = False
    try:
        torch.save(fn(rank, *args), Path(out) / f"rank{rank}.pt")
        clean = True
    finally:
        leave_process_group(clean)


def in_processes(fn, tmp_path: Path, *args) -> list:
    """``fn(rank, *args)`` in WORLD real processes of one gloo group; their return values."""
    torch.multiprocessing.spawn(
        _entry, args=(fn, free_port(), str(tmp_path), args), nprocs=WORLD, join=True
    )
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


# --------------------------------------------------------------------------- loss and gradient
class Tiny(nn.Module):
    """A small encoder with BatchNorm, so synchronised statistics matter."""

    out_dim = 6

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(16, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Linear(12, 6)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


LOSSES = config_groups()["loss"]  # every option of conf/loss: a new method is checked here too
# Each option at its defaults, a few at test sizes, and the variants worth checking on their own.
METHODS = {
    **{loss: [f"loss={loss}"] for loss in LOSSES},
    "moco": ["loss=moco", "loss.queue_size=64"],
    # 8 rows per process, 16 in all: key groups of 6, 5 and 5 that straddle the processes
    "moco-uneven-key-groups": ["loss=moco", "loss.queue_size=64", "loss.key_bn_splits=3"],
    "triplet": ["loss=triplet", "loss.mining=semihard"],
    "triplet-labels": ["loss=triplet", "loss.positives=labels", "loss.mining=hard"],
    "contrastive-labels": ["loss=contrastive", "loss.positives=labels"],
    # SwAV's queue filled with every rank's rows, and learning prototypes (frozen by default)
    "swav-queue": [
        "loss=swav",
        "loss.queue_size=32",
        "loss.queue_start_epoch=0",
        "loss.freeze_prototypes_epochs=0",
    ],
}
N = 16  # global batch


def _method(kind: str) -> nn.Module:
    cfg = compose(["trainer.batch_size=16", *METHODS[kind]])
    torch.manual_seed(0)
    return build(cfg.loss, encoder=Tiny()).double()


def _batch() -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(1)
    v1 = torch.randn(N, 1, 4, 4, generator=g, dtype=torch.float64)
    v2 = v1 + 0.3 * torch.randn(N, 1, 4, 4, generator=g, dtype=torch.float64)
    return v1, v2, torch.arange(N) % 4


def _step(method: nn.Module, forward, v1: Tensor, v2: Tensor, labels: Tensor) -> dict:
    loss = forward([v1, v2], labels)
    loss.backward()
    method.after_step(1, 10)
    return {
        "loss": loss.item(),
        "grads": {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None},
        "state": {k: v.clone() for k, v in method.state_dict().items()},
    }


def _ranked_step(rank: int, kind: str) -> dict:
    method = convert_sync_batchnorm(_method(kind))
    ddp = DistributedDataParallel(method)
    v1, v2, labels = _batch()
    rows = slice(rank * N // WORLD, (rank + 1) * N // WORLD)
    return _step(method, ddp, v1[rows], v2[rows], labels[rows])


def _all_ranked_steps(rank: int) -> dict:
    return {kind: _ranked_step(rank, kind) for kind in METHODS}


@pytest.fixture(scope="module")
def ranked_steps(tmp_path_factory) -> list[dict]:
    """Every kind's step in one pair of processes (one start-up, not one per kind)."""
    return in_processes(_all_ranked_steps, tmp_path_factory.mktemp("ranked"))


@pytest.mark.parametrize("kind", list(METHODS))
def test_each_rank_loss_and_ddp_gradient_equal_one_process(ranked_steps, kind):
    """float64: the mean of the ranks' losses is the global loss, the gradient DDP applies
    on every rank is the global gradient, and the method's state after the step (EMA
    copies, MoCo queue, BatchNorm statistics) is the one-process state, to 1e-10."""
    ranks = [r[kind] for r in ranked_steps]
    method = _method(kind)
    one = _step(method, method, *_batch())
    assert sum(r["loss"] for r in ranks) / WORLD == pytest.approx(one["loss"], rel=1e-10, abs=1e-12)
    for r in ranks:
        assert r["grads"].keys() == one["grads"].keys()
        for name, grad in one["grads"].items():
            torch.testing.assert_close(r["grads"][name], grad, rtol=1e-10, atol=1e-12, msg=name)
        for name, value in one["state"].items():
            torch.testing.assert_close(r["state"][name], value, rtol=1e-10, atol=1e-12, msg=name)


def _step_then_leave(rank: int) -> dict:
    """A MoCo step under DDP (the case that once aborted), then leaving as every entry
    point does (a barrier, the group freed while the interpreter is whole)."""
    loss = _ranked_step(rank, "moco")["loss"]
    leave_process_group(clean=True)
    return {"loss": loss, "initialized": dist.is_initialized()}


def test_processes_leave_cleanly_beside_busy_processes(tmp_path):
    """Issue 23: under load, rank 0 of the MoCo case died with SIGABRT ("terminate called
    without an active exception") at exit. Two rounds of two processes, each a DDP step,
    with two busy processes taking the cores: every process exits 0 (spawn raises
    otherwise) and each left the group."""
    method = _method("moco")
    one = _step(method, method, *_batch())["loss"]
    busy = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        for attempt in range(2):
            out = tmp_path / str(attempt)
            out.mkdir()
            ranks = in_processes(_step_then_leave, out)
            assert not any(r["initialized"] for r in ranks)
            assert sum(r["loss"] for r in ranks) / WORLD == pytest.approx(one, rel=1e-10)
    finally:
        for p in busy:
            p.kill()
            p.wait()


def _gather_rows(rank: int) -> dict:
    x = torch.arange(6, dtype=torch.float64).view(3, 2).add(10 * rank).requires_grad_()
    gathered, offset = all_gather(x)
    # Each rank weights every gathered row differently: row i of rank s gets (rank + 1) * i.
    weights = (rank + 1) * torch.arange(gathered.shape[0], dtype=torch.float64)[:, None]
    (gathered * weights).sum().backward()
    ids, _ = all_gather(torch.tensor([rank, rank]))
    return {"gathered": gathered.detach(), "offset": offset, "grad": x.grad, "ids": ids}


def test_all_gather_carries_gradients_summed_over_the_ranks(tmp_path):
    ranks = in_processes(_gather_rows, tmp_path)
    expected_rows = torch.cat([torch.arange(6.0).view(3, 2) + 10 * r for r in range(WORLD)])
    for rank, r in enumerate(ranks):
        assert torch.equal(r["gathered"], expected_rows.double())
        assert r["offset"] == 3 * rank
        assert torch.equal(r["ids"], torch.tensor([0, 0, 1, 1]))
        # d/dx of sum over ranks s of (s + 1) * i * row_i, for this rank's rows i = 3r..3r+2
        i = torch.arange(3 * rank, 3 * rank + 3, dtype=torch.float64)[:, None]
        assert torch.equal(r["grad"], (1 + 2) * i.expand(3, 2))


def _bn(rank: int) -> dict:
    torch.manual_seed(0)
    bn = SyncBatchNorm(3)
    x = torch.randn(8, 3, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    bn = bn.double()
    local = x[rank * 4 : (rank + 1) * 4].clone().requires_grad_()
    (bn(local) * torch.arange(48, dtype=torch.float64).view(4, 3, 2, 2)[:4]).sum().backward()
    return {"grad": local.grad, "mean": bn.running_mean, "var": bn.running_var, "w": bn.weight.grad}


def test_sync_batchnorm_equals_batchnorm_on_the_global_batch(tmp_path):
    ranks = in_processes(_bn, tmp_path)
    bn = nn.BatchNorm2d(3).double()
    x = torch.randn(8, 3, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    x.requires_grad_()
    weights = torch.arange(48, dtype=torch.float64).view(4, 3, 2, 2).repeat(2, 1, 1, 1)
    (bn(x) * weights).sum().backward()
    for rank, r in enumerate(ranks):
        torch.testing.assert_close(r["grad"], x.grad[rank * 4 : (rank + 1) * 4])
        torch.testing.assert_close(r["mean"], bn.running_mean)
        torch.testing.assert_close(r["var"], bn.running_var)
    # DDP averages parameter gradients; each rank's own is its share of the sum
    torch.testing.assert_close(ranks[0]["w"] + ranks[1]["w"], bn.weight.grad)


# --------------------------------------------------------------------------- 3 real steps
STEPS = 3
E2E = {
    **{loss: [f"loss={loss}"] for loss in LOSSES},
    "moco": ["loss=moco", "loss.queue_size=256"],
    "moco-uneven-key-groups": ["loss=moco", "loss.queue_size=256", "loss.key_bn_splits=3"],
    # Mining picks discrete triplets: with same-class positives, near-ties between negatives
    # are common, and a 1e-7 rounding difference may pick another one (a jump of ~1e-4 in
    # the loss). "all" has no such choice; hard and semi-hard are exact in float64 above.
    # Seed 1: with the default seed, at step 3 one pre-activation of the projector's ReLU is
    # 1.2e-7 on one process and -5.5e-8 on two (a kink, as for SupCon below): the step-3
    # gradient jumps by 7.5% of its largest element in projector.0.weight, 0.5% in
    # encoder.net.0.weight (steps 1 and 2 agree to 1e-6), and the weights by 2e-6. With
    # seed 1 no pre-activation lies within rounding of 0 (nor with margin 0.1 or 0.5, or a
    # hidden layer of 256): two processes equal one with 1 or 2 threads to the tolerance.
    "triplet-labels": [
        "loss=triplet",
        "loss.positives=labels",
        "loss.mining=all",
        "trainer.seed=1",
    ],
    "contrastive-labels": ["loss=contrastive", "loss.positives=labels"],
    "dino-local-crops": ["loss=dino", "data.augment.local_crops=2"],
    # SwAV's queue full after step 1 and in Sinkhorn at steps 2 and 3, prototypes learning
    "swav-queue-local-crops": [
        "loss=swav",
        "loss.queue_size=64",
        "loss.queue_start_epoch=0",
        "loss.freeze_prototypes_epochs=0",
        "data.augment.local_crops=2",
    ],
    # A ReLU is a kink: at step 3 one pre-activation of SupCon's BatchNorm-free projector lies
    # within rounding of 0, and float32 summation order puts it on either side (one hidden
    # unit's gradient for one sample, 1e-3 of the encoder's gradient; the float64 checks
    # above are exact). The projector with BatchNorm has no such near-zero unit on this data.
    "supcon": ["loss=supcon", "loss.projector.batch_norm=true"],
}


def _three_steps(rank: int, overrides: list[str], world: int) -> dict:
    """Build a run as `contrast train` does (digits, real batches and augmentation), train
    3 steps, return what a checkpoint would hold."""
    from contrastive_cli.builder import build_run, train_steps

    cfg = compose(
        [*TINY, "device=cpu", "optim=sgd", "trainer.deterministic=true", "eval.every=0", *overrides]
    )
    d = Dist(rank, world, rank)
    built = build_run(cfg, d)
    method, optimizer = built.training.method, built.training.optimizer
    progress = train_steps(built, STEPS, cfg.trainer.epochs, cfg.trainer.seed, d)
    return {
        "method": {k: v.clone() for k, v in method.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "losses": list(progress.step_losses),
        "step": progress.step,
    }


def _all_three_steps(rank: int) -> dict:
    return {kind: _three_steps(rank, o, WORLD) for kind, o in E2E.items()}


def test_three_steps_on_two_processes_equal_one_process(tmp_path):
    """Weights, BatchNorm statistics, EMA copies, the MoCo queue, optimizer state and the
    per-step losses after 3 real steps (digits, batch 64, deterministic kernels) equal one
    process at the same global batch. The tolerance covers float32 summation order only:
    gradients and BatchNorm sums are reduced in another order across processes, which
    changes values by ~1e-7 relative. SGD keeps that size (1e-5 relative, 1e-6 absolute
    here); Adam would not: it scales every update to ~lr whatever the gradient's size, so a
    gradient element that is pure rounding noise moves its weight by up to lr (measured:
    1.6e-4 after 3 BYOL steps), which is why this test uses optim=sgd. The optimizer's
    momentum buffers are gradients, whose rounding is relative to the largest of them, not
    to each element (the Barlow Twins loss sums D terms: gradients up to ~10, rounding up to
    ~1e-5 on elements near 0), so their absolute tolerance is 1e-5 of the tensor's largest
    value (at least 1e-6). A gather without gradients or an unsynchronised BatchNorm differs
    by more than 1e-3."""
    ranks = in_processes(_all_three_steps, tmp_path)
    for kind, overrides in E2E.items():
        one = _three_steps(0, overrides, 1)
        assert one["step"] == STEPS
        for r in ranks:
            got = r[kind]
            assert got["step"] == STEPS
            torch.testing.assert_close(
                torch.tensor(got["losses"]),
                torch.tensor(one["losses"]),
                rtol=1e-5,
                atol=1e-6,
                msg=kind,
            )
            for name, value in one["method"].items():
                torch.testing.assert_close(
                    got["method"][name], value, rtol=1e-5, atol=1e-6, msg=f"{kind}: {name}"
                )
            for i, state in one["optimizer"]["state"].items():
                for key, value in state.items():
                    largest = value.abs().max().item() if value.numel() else 0.0
                    torch.testing.assert_close(
                        got["optimizer"]["state"][i][key],
                        value,
                        rtol=1e-5,
                        atol=max(1e-6, 1e-5 * largest),
                        msg=f"{kind}: optimizer {i} {key}",
                    )


# --------------------------------------------------------------------------- launchers' env
def test_torchrun_environment_gives_the_place():
    place = place_from_env(
        {
            "RANK": "3",
            "WORLD_SIZE": "8",
            "LOCAL_RANK": "1",
            "MASTER_ADDR": "n1",
            "MASTER_PORT": "29400",
        }
    )
    assert (place.rank, place.world_size, place.local_rank) == (3, 8, 1)
    assert (place.master_addr, place.master_port) == ("n1", 29400)
    assert place_from_env({"WORLD_SIZE": "1", "RANK": "0"}) is None
    assert place_from_env({}) is None


def test_slurm_environment_gives_rank_world_local_rank_and_the_rendezvous():
    env = {
        "SLURM_PROCID": "9",
        "SLURM_NTASKS": "16",
        "SLURM_LOCALID": "1",
        "SLURM_JOB_NODELIST": "gpu[007-008],cpu3",
        "SLURM_JOB_ID": "123456",
    }
    place = place_from_env(env)
    assert (place.rank, place.world_size, place.local_rank) == (9, 16, 1)
    assert place.master_addr == "gpu007"
    assert place.master_port == 15000 + 123456 % 20000
    assert place_from_env({**env, "MASTER_PORT": "4000"}).master_port == 4000
    assert place_from_env({**env, "SLURM_NTASKS": "1"}) is None


@pytest.mark.parametrize(
    ("nodelist", "hosts"),
    [
        ("node1", ["node1"]),
        ("gpu[01-03,07]", ["gpu01", "gpu02", "gpu03", "gpu07"]),
        ("a[9-11],b2,c[1]", ["a9", "a10", "a11", "b2", "c1"]),
    ],
)
def test_slurm_nodelists_expand(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


def test_the_slurm_launcher_config_composes_with_nodes_and_gpus():
    from contrastive_cli.command_line import compose_with_hydra

    cfg = compose_with_hydra(
        ["hydra/launcher=slurm", "hydra.launcher.nodes=2", "hydra.launcher.gpus_per_node=8"]
    )
    assert cfg.hydra.launcher.nodes == 2
    assert cfg.hydra.launcher.tasks_per_node == 8  # one task (process) per GPU

"""Where a run's processes come from: one process, ``trainer.devices=N`` processes started
here by torch's elastic launcher, or processes started by torchrun / SLURM.

``run_job`` is what every command that trains calls (train, resume, reproduce):

- started by torchrun or as SLURM tasks (``place_from_env``): this process joins the group
  and trains its share; the processes check that they agree on the run directory;
- ``trainer.devices=N`` > 1: this process holds the run directory's lock and starts N workers
  with ``torch.distributed.launcher`` (elastic: a lost worker stops the others, and
  ``trainer.max_restarts`` restarts them all from the last checkpoint);
- otherwise: one process, as always.

A worker that fails leaves its one-line error in a file for the launcher, which prints the
first failure (naming the rank) and exits with its code; no worker prints a traceback for
an error a user can fix.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from contrastive_cli import failures
from contrastive_cli.distributed import Dist, Place, init_process_group, place_from_env
from contrastive_cli.errors import ConfigError, UserError
from contrastive_cli.signals import Interrupted

log = logging.getLogger(__name__)
STOP_FILE = "stop"  # in the folder launcher and workers share: the launcher was stopped
SHUTDOWN_S = 120  # how long a stopping worker may take to save its checkpoint


def run_job(cfg: DictConfig, run_dir: Path, choices: dict[str, str]) -> dict[str, Any]:
    """Train ``cfg`` into ``run_dir`` on as many processes as configured (module docstring)."""
    from contrastive_cli.run import run_training

    place = place_from_env()
    if place is not None:
        if cfg.trainer.devices > 1:
            raise ConfigError(
                f"trainer.devices={cfg.trainer.devices} is not allowed under torchrun or SLURM "
                f"(this job already has {place.world_size} processes); allowed: 1, and the "
                "launcher's own settings (--nproc-per-node, tasks per node) for the count"
            )
        try:
            dist = _join(place, cfg)
            _agree_on_run_dir(dist, run_dir)
            return run_training(cfg, run_dir, choices, dist=dist, lock=dist.main)
        except Exception as e:
            if _lost_a_peer(e):
                raise UserError(f"lost contact with another process ({_line(e)})") from None
            raise
        finally:
            _leave()
    if cfg.trainer.devices > 1:
        from contrastive_cli import writer

        with writer.lock(run_dir, "resume" if cfg.trainer.resume else "train"):
            return launch(cfg, run_dir, choices)
    return run_training(cfg, run_dir, choices)


def _join(place: Place, cfg: DictConfig) -> Dist:
    from contrastive_cli.config import build

    device = build(cfg.device).device
    if device.type == "cpu":  # N processes share the cores instead of each taking all of them
        import torch

        local = int(os.environ.get("LOCAL_WORLD_SIZE", place.world_size))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(local, 1)))
    try:
        return init_process_group(place, device.type)
    except (RuntimeError, ValueError, OSError) as e:  # port in use, host unreachable, timeout
        raise UserError(
            f"cannot join the process group at {place.master_addr}:{place.master_port} as rank "
            f"{place.rank} of {place.world_size} ({_line(e)})"
        ) from None


def _agree_on_run_dir(dist: Dist, run_dir: Path) -> None:
    import torch.distributed as torch_dist

    dirs: list[str | None] = [None] * dist.world_size
    torch_dist.all_gather_object(dirs, str(run_dir.resolve()))
    if len(set(dirs)) > 1:
        raise ConfigError(
            f"the processes disagree on the run directory ({dirs[0]} on rank 0, {run_dir} on "
            f"rank {dist.rank}); allowed: the same hydra.run.dir=<shared folder> on every process"
        )


# --------------------------------------------------------------------------- trainer.devices=N
def launch(cfg: DictConfig, run_dir: Path, choices: dict[str, str]) -> dict[str, Any]:
    """Start ``trainer.devices`` workers with torch's elastic launcher; rank 0's results."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    n = int(cfg.trainer.devices)
    config = LaunchConfig(
        min_nodes=1,
        max_nodes=1,
        nproc_per_node=n,
        run_id=f"contrast-{uuid.uuid4().hex[:8]}",
        rdzv_backend="c10d",
        rdzv_endpoint="127.0.0.1:0",  # a free port
        max_restarts=int(cfg.trainer.max_restarts),
        monitor_interval=0.1,
        start_method="spawn",
        shutdown_timeout=SHUTDOWN_S,
        **(  # SIGINT is the launcher's own (see _our_agent); this torch writes it to the env
            {HANDLED_BY_TORCH_FIELD: TORCH_HANDLES}
            if HANDLED_BY_TORCH_FIELD in getattr(LaunchConfig, "__dataclass_fields__", {})
            else {}
        ),
    )
    errors = Path(tempfile.mkdtemp(prefix="contrast-workers-"))
    config_dict = OmegaConf.to_container(cfg, resolve=True)
    restarts = failures.Restarts(run_dir, errors, n, int(cfg.trainer.max_restarts))
    with _to_train_log(run_dir):
        try:
            log.info(f"starting {n} processes (torch.distributed, elastic launcher)")
            with _quiet_elastic(), _our_agent(restarts, errors / STOP_FILE):
                results = elastic_launch(config, worker)(
                    config_dict, str(run_dir), choices, str(errors)
                )
        except ChildFailedError as e:
            exit_codes = {rank: f.exitcode for rank, f in e.failures.items()}
            failure = failures.first_failure(exit_codes, errors, restarts.attempt, n)
            error = failures.as_error(failure, n, run_dir)
            if not failure.interrupted:
                failures.record_failure(run_dir, failure, n, str(error), restarts.records)
            raise error from None
        except (SignalException, KeyboardInterrupt) as e:  # KeyboardInterrupt: at rendezvous
            signum = int(e.sigval) if isinstance(e, SignalException) else signal.SIGINT
            message = (
                f"stopped by {signal.Signals(signum).name}; continue with: contrast resume "
                f"{run_dir}"
            )
            if failures.record_interrupted(run_dir, message):  # else rank 0 said it
                log.info(message)
            raise Interrupted(signum, message) from None
        finally:
            shutil.rmtree(errors, ignore_errors=True)
    return results.get(0) or {}


@contextlib.contextmanager
def _to_train_log(run_dir: Path) -> Iterator[None]:
    """The launcher's own lines (processes started, restarts) in train.log too, as rank 0's."""
    from contrastive_cli import writer

    with writer.logging_to(writer.safe_path(run_dir, "train.log")):
        yield


@contextlib.contextmanager
def _quiet_elastic() -> Iterator[None]:
    """torch elastic logs every worker failure with a traceback and warns of the signal it
    received, and multiprocessing's resource tracker warns about the semaphore a killed
    worker held; ours is one line. torch gives each of its modules a logger with its own
    level, so each one is set, not only their parent."""
    prefixes = ("torch.distributed.elastic", "torch.multiprocessing")
    names = [n for n in logging.root.manager.loggerDict if n.startswith(prefixes)]
    loggers = [logging.getLogger(n) for n in {*prefixes, *names}]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    # The tracker is a child process: it takes its warning filters from the environment.
    os.environ.setdefault("PYTHONWARNINGS", "ignore:resource_tracker:UserWarning")
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


@contextlib.contextmanager
def _our_agent(restarts: failures.Restarts, stop_file: Path) -> Iterator[None]:
    """torch's elastic agent, with two additions while ``elastic_launch`` runs:

    - ``restarts`` sees each failure of the group and each start of new processes (to
      record restarts);
    - workers start with SIGINT ignored, so that a Ctrl-C while they import torch (before
      they can handle it) does not kill them with a KeyboardInterrupt traceback; the
      launcher takes Ctrl-C itself, leaves ``stop_file`` for workers that were still
      starting (``worker`` checks it once its handler is in place), and torch's agent
      passes the signal on to the others. A Ctrl-C while the launcher itself creates the
      processes (SIGINT ignored there too, milliseconds; longer on a loaded machine) is
      lost: the run goes on and a second Ctrl-C stops it. Blocking SIGINT instead of
      ignoring it would not keep it: torch's store threads, which do not block it, would
      take it and drop it.

    ``elastic_launch`` builds its ``LocalElasticAgent`` itself; this swaps in a subclass
    that overrides ``_monitor_workers`` and ``_start_workers``, the methods torch documents
    for agents to implement. Without that class (another torch), the run is the same, only
    restarts go unrecorded and a Ctrl-C at start-up may print a worker's traceback."""
    import torch.distributed.launcher.api as launcher_api
    from torch.distributed.elastic.agent.server.api import WorkerState
    from torch.distributed.elastic.multiprocessing.api import SignalException

    base = getattr(launcher_api, "LocalElasticAgent", None)
    if base is None:
        yield
        return

    def on_sigint(signum: int, frame: Any) -> None:
        with contextlib.suppress(OSError):
            stop_file.touch()
        raise SignalException(f"Process {os.getpid()} got signal: {signum}", signal.SIGINT)

    class Agent(base):  # type: ignore[misc, valid-type]
        def _monitor_workers(self, worker_group: Any) -> Any:
            result = super()._monitor_workers(worker_group)
            if result.state in (WorkerState.FAILED, WorkerState.UNHEALTHY):
                restarts.failed({r: f.exitcode for r, f in result.failures.items()})
            return result

        def _start_workers(self, worker_group: Any) -> Any:
            restarts.starting()
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # what the new processes inherit
            try:
                return super()._start_workers(worker_group)
            finally:
                signal.signal(signal.SIGINT, on_sigint)

    handled = os.environ.get(HANDLED_BY_TORCH)
    os.environ[HANDLED_BY_TORCH] = TORCH_HANDLES  # SIGINT is on_sigint's
    launcher_api.LocalElasticAgent = Agent
    previous = signal.getsignal(signal.SIGINT)
    try:
        yield
    finally:
        launcher_api.LocalElasticAgent = base
        signal.signal(signal.SIGINT, previous)
        if handled is None:
            os.environ.pop(HANDLED_BY_TORCH, None)
        else:
            os.environ[HANDLED_BY_TORCH] = handled


HANDLED_BY_TORCH = "TORCHELASTIC_SIGNALS_TO_HANDLE"  # the signals torch's launcher traps
HANDLED_BY_TORCH_FIELD = "signals_to_handle"  # LaunchConfig's copy of it, where it has one
TORCH_HANDLES = "SIGTERM,SIGHUP,SIGQUIT"
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _stop_quietly(signum: int, frame: Any) -> None:
    raise Interrupted(signum)


def worker(config: dict, run_dir: str, choices: dict[str, str], errors: str) -> dict | None:
    """One of the N processes ``launch`` starts (rank and rendezvous from the environment).

    It leaves the terminal's process group, so Ctrl-C reaches only the launcher, which
    passes it on once; and it asks the kernel for SIGTERM if the launcher dies, so no worker
    outlives it. A restarted group (``trainer.max_restarts``) resumes from the checkpoint.
    """
    from contrastive_cli.run import run_training

    _detach()
    place = place_from_env()
    assert place is not None, "started without torch elastic's environment"
    _worker_logging(place.rank)
    cfg = OmegaConf.create(config)
    OmegaConf.set_struct(cfg, True)
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if attempt > 0:
        cfg.trainer.resume = True
        failures.load_restarts(errors)
    for s in STOP_SIGNALS:  # until training handles them: exit quietly (see _our_agent)
        signal.signal(s, _stop_quietly)
    try:
        if (Path(errors) / STOP_FILE).exists():  # the launcher was stopped while this started
            raise Interrupted(signal.SIGINT)
        dist = _join(place, cfg)
        return run_training(cfg, Path(run_dir), choices, dist=dist, lock=False) or None
    except Interrupted as e:
        sys.exit(e.exit_code)
    except UserError as e:
        failures.report(errors, attempt, place.rank, "error", str(e), e.exit_code)
        sys.exit(e.exit_code)
    except Exception as e:  # the launcher says which rank failed first, and why
        if _lost_a_peer(e):
            message = f"lost contact with another process ({_line(e)})"
            failures.report(errors, attempt, place.rank, "lost", message, 1)
        else:
            message = f"{type(e).__name__}: {_line(e)}"
            failures.report(errors, attempt, place.rank, "crash", message, 1, e)
        sys.exit(1)
    finally:
        # Exiting now: a signal from the launcher (stopping the group) ends the process as
        # it would have, never as an Interrupted raised while leaving the group (its garbage
        # collection takes a moment) or inside interpreter shutdown.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        _leave()


def _detach() -> None:
    with contextlib.suppress(OSError):
        os.setsid()
    if sys.platform.startswith("linux"):
        with contextlib.suppress(Exception):
            import ctypes

            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _worker_logging(rank: int) -> None:
    """Rank 0 logs to the console as one process would; the others only warn."""
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(message)s",
        stream=sys.stdout,
        force=True,
    )


def _lost_a_peer(e: BaseException) -> bool:
    """A collective that failed because another process went away (gloo/NCCL)."""
    import torch.distributed as torch_dist

    text = str(e)
    return isinstance(e, getattr(torch_dist, "DistError", ())) or any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer", "gloo")
    )


def _line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:200]


def _leave() -> None:
    """No barrier: the other ranks return from training while rank 0 evaluates (minutes on
    a large dataset, past a collective's timeout), and rank 0, which may host the
    rendezvous store, is the last to leave anyway. What matters here is that the process
    group is freed before interpreter shutdown (``leave_process_group``)."""
    from contrastive_cli.distributed import leave_process_group

    leave_process_group(clean=False)

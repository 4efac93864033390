"""One run, in named steps: build everything from the config (``builder``), restore a
checkpoint (``restore``), train (``train``, with the callbacks below), finish (``finish``:
export, evaluate, plot). ``RunFiles`` (``runfiles``) owns the run directory's files.

The CLI calls ``run_training``; tests call it too, with a composed config and a temp dir.
See docs/architecture.md for the events and where a new callback or evaluator goes.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from contrastive_cli import failures, writer
from contrastive_cli.builder import Built, build_run
from contrastive_cli.callbacks.budget import TimeBudget
from contrastive_cli.callbacks.checkpointing import Checkpointing
from contrastive_cli.callbacks.divergence import Divergence
from contrastive_cli.callbacks.metrics_file import MetricsFile
from contrastive_cli.callbacks.monitor import Monitor
from contrastive_cli.callbacks.progress import EpochLine, ProgressBar
from contrastive_cli.callbacks.signals import Signals
from contrastive_cli.callbacks.trackers import TrackerLog
from contrastive_cli.distributed import SINGLE, Dist
from contrastive_cli.errors import Diverged, RunExists, UserError
from contrastive_cli.events import Callback, Loop, Progress
from contrastive_cli.finish import finish
from contrastive_cli.progress import Task
from contrastive_cli.progress import configure as progress_lines
from contrastive_cli.record import ConfigRecord
from contrastive_cli.report import MetricsLog, versions
from contrastive_cli.restore import check_resumable, restore
from contrastive_cli.runfiles import CHECKPOINT, RunFiles
from contrastive_cli.signals import GracefulStop, Interrupted
from contrastive_cli.tracking import Trackers, build_trackers
from contrastive_cli.train import train
from contrastive_cli.validate import validate

log = logging.getLogger(__name__)


def run_training(
    cfg: DictConfig,
    run_dir: Path,
    choices: dict[str, str] | None = None,
    dist: Dist = SINGLE,
    lock: bool = True,
) -> dict[str, Any]:
    """Train and evaluate the run that ``cfg`` describes, in ``run_dir``. Returns results.json
    (on the main process; the others return an empty dict). ``lock``: hold the run
    directory's lock (a launcher of several processes holds it for them)."""
    started = time.time()
    with _shown("checking the config", dist):  # builds each object: imports torch's modules
        validate(cfg)
    progress_lines(cfg.trainer.get("log_every_s"))
    check_resumable(cfg, run_dir)  # before anything in run_dir is touched
    run_dir.mkdir(parents=True, exist_ok=True)
    files = RunFiles(run_dir, writes=dist.main)
    held = writer.lock(run_dir, "resume" if cfg.trainer.resume else "train")
    with held if lock else contextlib.nullcontext():
        if (
            dist.main
            and not cfg.trainer.resume
            and any((run_dir / f).exists() for f in ("results.json", str(CHECKPOINT.parent)))
        ):
            raise RunExists(
                f"run directory {run_dir} already holds a run; resume it with `contrast resume "
                f"{run_dir}` or choose a new directory"
            )
        with files.logging_to_train_log():
            return _tracked(cfg, files, choices or {}, started, dist)


def _tracked(
    cfg: DictConfig, files: RunFiles, choices: dict[str, str], started: float, dist: Dist
) -> dict[str, Any]:
    """The run, with its trackers (rank 0's) started first and told how it ended, on
    every way out: completed, interrupted, diverged or failed."""
    run_dir = files.path
    trackers, outcome = Trackers(), ("failed", {})
    try:
        trackers = build_trackers(cfg, rank=dist.rank)
        resolved = OmegaConf.to_container(cfg, resolve=True)
        trackers.start(run_dir, resolved, choices, bool(cfg.trainer.resume))
        stop = GracefulStop(run_dir / CHECKPOINT)
        with stop:
            results = _run(cfg, files, choices, started, stop, dist, trackers)
        outcome = ("completed", results)
        return results
    except Interrupted as e:
        if dist.main and files.read_status() != "interrupted":  # stopped outside the loop
            files.results({"status": "interrupted", "run_dir": str(run_dir), "error": str(e)})
            log.info(str(e))
        outcome = ("interrupted", _results_or(run_dir, {"error": str(e)}))
        raise
    except Diverged as e:
        outcome = ("diverged", _results_or(run_dir, {"error": str(e)}))
        raise
    except Exception as e:  # commands/train.py records the failure in results.json
        error = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
        outcome = ("failed", {"error": error})
        raise
    finally:
        trackers.finish(*outcome, run_dir)


def _shown(what: str, dist: Dist) -> contextlib.AbstractContextManager[Any]:
    """Progress of ``what`` on the main process (the others stay quiet)."""
    return Task(what) if dist.main else contextlib.nullcontext()


def _results_or(run_dir: Path, default: dict[str, Any]) -> dict[str, Any]:
    """results.json of ``run_dir`` (what a stopped run wrote), else ``default``."""
    from contrastive_cli.rundirs import read_results

    results, _ = read_results(run_dir / "results.json")
    return results if results is not None else default


def _run(
    cfg: DictConfig,
    files: RunFiles,
    choices: dict[str, str],
    started: float,
    stop: GracefulStop,
    dist: Dist,
    trackers: Trackers,
) -> dict[str, Any]:
    """Build, restore, train with the callbacks, finish (rank 0)."""
    with _shown(f"loading the data ({cfg.data.name}) and building the model", dist):
        built = build_run(cfg, dist)
    s = built.settings
    record = ConfigRecord(cfg, built.starting)
    progress, earlier_s = (
        restore(built.training, built.runtime.device, files, record.resolved, s.epochs)
        if s.resume
        else (Progress(), 0.0)
    )
    started -= earlier_s  # wall times count the earlier attempts, as train_time_s does
    metrics_log = files.metrics(keep_epochs=progress.epoch)
    summary = Summary(
        files,
        started,
        record,
        {
            "run_dir": str(files.path),
            "data": s.data,
            "encoder": choices.get("encoder"),
            "loss": choices.get("loss"),
            "epochs": s.epochs,
            "seed": s.seed,
            "device": built.runtime.describe(),
            "processes": dist.world_size,
            **({"starting_weights": built.starting} if built.starting else {}),
            **failures.restarts_so_far(),  # an elastically restarted group's earlier failures
        },
    )
    batches = built.training.batches
    processes = f" x {dist.world_size} processes" if dist.several else ""
    log.info(
        f"training {choices.get('loss', '')} on {s.data} ({len(built.data.pretrain)} images, "
        f"{len(batches)} steps/epoch) on {built.runtime.describe()}{processes}; "
        f"run dir {files.path}"
    )
    callbacks = run_callbacks(built, files, record, summary, stop, trackers, dist, metrics_log)
    progress = train(
        built.training,
        built.augment,
        built.runtime,
        s.epochs,
        s.seed,
        progress,
        callbacks,
        s.grad_clip,
        dist,
    )
    if not dist.main:
        return {}
    assert metrics_log is not None
    title = f"{choices.get('loss', '')} on {s.data}"
    return finish(
        built, files, summary.head(), progress, metrics_log.records(), started, trackers, title
    )


def run_callbacks(
    built: Built,
    files: RunFiles,
    record: ConfigRecord,
    summary: Summary,
    stop: GracefulStop,
    trackers: Trackers,
    dist: Dist,
    metrics_log: MetricsLog | None,
) -> list[Callback]:
    """The run's callbacks, in the order they hear each event: the monitor first (the time
    budget counts its time), the budget before anything logs the epoch (it takes the first
    step's time out of the record), the checkpoint after the epoch is logged, signals after
    the checkpoint (a stop saves first). Rank 0 monitors, logs and saves; the others train on.
    """
    s = built.settings

    def fixed(epochs: int) -> None:  # the time budget's epoch count, as the run records it
        saved = record.fix_epochs(epochs)
        if dist.main:  # what reproduce reruns: this many epochs, no budget to measure
            files.config(saved)

    head: list[Callback] = []
    if built.monitor is not None or built.labelfree_monitor is not None:
        head.append(Monitor(built.monitor, s.monitor_every, built.labelfree_monitor))
    head.append(TimeBudget(s.time_budget, dist, fixed))
    tail: list[Callback] = [Signals(stop, files.path, summary.stopped), Divergence(summary.stopped)]
    if not dist.main:
        return head + tail
    assert metrics_log is not None
    return [
        ProgressBar(s.log_every),
        *head,
        MetricsFile(metrics_log),
        TrackerLog(trackers, s.log_every),
        EpochLine(),
        Checkpointing(
            files.checkpoint,
            record,
            s.checkpoint,
            lambda: time.time() - summary.started,
            s.checkpoint_every_s,
        ),
        *tail,
    ]


class Summary:
    """The head of results.json (run, data, method, epochs, device), shared by every way a
    run ends; ``stopped`` writes the results.json of an interrupted or diverged run."""

    def __init__(self, files: RunFiles, started: float, record: ConfigRecord, head: dict):
        self.files, self.started, self.record, self._head = files, started, record, head

    def head(self) -> dict[str, Any]:
        """The head, with the epoch count as the run records it (after a time budget)."""
        return {**self._head, "epochs": self.record.epochs}

    def stopped(self, status: str, loop: Loop, error: str) -> None:
        self.files.results(
            {
                "status": status,
                **self.head(),
                "error": error,
                "epoch": loop.progress.epoch,
                "steps": loop.progress.step,
                "wall_time_s": time.time() - self.started,
                "versions": versions(),
            }
        )

"""``contrast train``: Hydra composes the config (overrides, -m sweeps, --help), then
``run_training`` does the work."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from contrastive_cli.command_line import check_command_line
from contrastive_cli.config import CONF_DIR, expand_home
from contrastive_cli.errors import (
    ConfigError,
    DataError,
    Refused,
    RunExists,
    UserError,
    error_lines,
)
from contrastive_cli.rebuild import saved_config
from contrastive_cli.signals import Interrupted
from contrastive_cli.untrusted import printable

log = logging.getLogger(__name__)
HELP = "train an encoder with a contrastive loss, then evaluate it (Hydra overrides)"


def place_from_env():  # -> contrastive_cli.distributed.Place | None
    """``distributed.place_from_env`` without importing torch in the usual single process
    (it returns None unless a launcher set RANK or SLURM_PROCID), so a typo is reported
    before torch loads."""
    if "RANK" not in os.environ and "SLURM_PROCID" not in os.environ:
        return None
    from contrastive_cli.distributed import place_from_env as place

    return place()


def objective(results: dict) -> float:
    """What sweepers optimise: the headline k-NN accuracy (first of eval.knn_k)."""
    knn = [v for k, v in (results.get("metrics") or {}).items() if k.startswith("knn_k")]
    return float(knn[0]) if knn else math.nan


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def _train_task(cfg: DictConfig) -> float:
    from contrastive_cli.launch import run_job

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    multirun = hc.mode == RunMode.MULTIRUN
    place = place_from_env()  # one of several processes started by torchrun or SLURM
    main = place is None or place.rank == 0
    try:
        if main:
            # The saved config is complete and resolved: the record that commands reading
            # this run compare their rebuilt config with (contrastive_cli.rebuild).
            # Values read from the environment are not written (saved_config).
            (run_dir / hc.output_subdir / "config.yaml").write_text(saved_config(cfg))
        return objective(run_job(cfg, run_dir, dict(hc.runtime.choices)))
    except UserError as e:
        refused = isinstance(e, (RunExists, Refused))  # nothing in run_dir was changed
        if (
            main
            and not multirun
            and not refused
            and isinstance(e, (DataError, ConfigError))  # data missing, or too few images
            and _only_started(run_dir, cfg)
        ):
            _remove_run_dir(run_dir)  # nothing ran: no `failed` directory to list or clean up
        elif main and not refused and not (run_dir / "results.json").exists():
            _record_failure(run_dir, str(e))
        if cfg.get("debug"):
            raise
        if multirun:
            for line in error_lines(e):
                log.error(f"error: {printable(line)}")
            return math.nan
        for line in error_lines(e):
            print(f"error: {printable(line)}", file=sys.stderr)
        sys.exit(e.exit_code)
    except Exception as e:  # a bug: keep the traceback, but let a sweep's other jobs run
        if main:
            _record_failure(run_dir, f"{type(e).__name__}: {e}")
        if multirun and not cfg.get("debug"):
            log.exception("job failed")
            return math.nan
        raise


# What a run directory holds before training starts: Hydra's config, the log, the lock.
_STARTED_ONLY = {".hydra", "train.log", ".lock"}


def _only_started(run_dir: Path, cfg: DictConfig) -> bool:
    """The run directory of a new run that has written nothing of its own yet."""
    if cfg.trainer.get("resume") or not run_dir.is_dir():
        return False
    return {p.name for p in run_dir.iterdir()} <= _STARTED_ONLY


def _remove_run_dir(run_dir: Path) -> None:
    """Remove a run directory that holds only what starting it wrote (and its date folder,
    when that is left empty). Best effort: the error is what the user must see."""
    with contextlib.suppress(OSError):
        shutil.rmtree(run_dir)
        if re.fullmatch(r"\d{4}-\d\d-\d\d", run_dir.parent.name):
            run_dir.parent.rmdir()  # outputs/<date>/ when this was its only run


def _record_failure(run_dir: Path, error: str) -> None:
    """results.json with status failed, for `contrast runs` and sweep tables. Best effort: on a
    full or read-only disk the error itself is what the user must see, not a second one."""
    from contrastive_cli.report import write_json

    with contextlib.suppress(OSError):
        write_json(
            run_dir / "results.json", {"status": "failed", "error": error, "run_dir": str(run_dir)}
        )


def _explicit_run_dir(args: list[str]) -> tuple[int, Path] | None:
    """(position in ``args``, the folder) of a ``hydra.run.dir``/``hydra.sweep.dir`` given
    on the command line, resolved by real path (``<missing>/../<run>`` is ``<run>``, as it
    will be once Hydra has created ``<missing>``); None when not given or interpolated."""
    for i, arg in enumerate(args):
        key, _, value = arg.partition("=")
        if key.lstrip("+~") in ("hydra.run.dir", "hydra.sweep.dir") and value:
            if "${" in value or value[0] in "'\"":  # Hydra resolves or unquotes these
                return None
            return i, Path(os.path.realpath(Path(value).expanduser()))
    return None


def _help(args: list[str]) -> int | None:
    """``contrast train [overrides] --help [KEY]``: the settings reference (``reference``),
    for the group choices given and one section or key when KEY is given; None when the
    command line asks for something else. No torch, no run directory."""
    flags = [i for i, a in enumerate(args) if a in ("-h", "--help")]
    if not flags:
        return None
    from contrastive_cli.reference import reference

    i = flags[0]
    nxt = args[i + 1] if i + 1 < len(args) else None
    only = nxt if nxt is not None and not nxt.startswith("-") and "=" not in nxt else None
    rest = [a for j, a in enumerate(args) if j != i and not (only is not None and j == i + 1)]
    overrides = [a for a in rest if "=" in a and not a.startswith("-")]
    print(reference(overrides, only))
    return 0


def _announce(cfg: DictConfig) -> None:
    """The run's first line, once its settings' names and plain values are right: what
    comes next (importing torch, checking each object's arguments, Hydra, the data) takes
    seconds, up to a minute on a busy machine."""
    choice = OmegaConf.select(cfg, "hydra.runtime.choices", default=None) or {}
    print(
        f"starting {choice.get('loss', 'a run')} on {choice.get('data', 'its data')}: importing "
        "torch, checking the objects' settings, loading the data",
        flush=True,
    )


def _holds_a_run(folder: Path) -> bool:
    return any(os.path.lexists(folder / f) for f in ("results.json", "checkpoints", ".hydra"))


def main(args: list[str]) -> int:
    args = [expand_home(a) for a in args]  # the shell leaves ~ in data.path=~/photos
    if (code := _help(args)) is not None:
        return code
    # Hydra writes .hydra/ into the run directory before any of our code runs, so a run
    # directory given on the command line is checked here, before Hydra starts.
    found = _explicit_run_dir(args)
    explicit = None
    if found is not None:  # Hydra then writes where we checked, whatever links lead there
        i, explicit = found
        args[i] = f"{args[i].partition('=')[0]}={explicit}"
    resuming = any(
        a.lstrip("+").startswith("trainer.resume=") and a.split("=", 1)[1].lower() == "true"
        for a in args
    )
    place = place_from_env()
    if place is not None and explicit is None and not {"-m", "--multirun"} & set(args):
        raise ConfigError(
            f"this is one of {place.world_size} processes (torchrun or SLURM): they must share "
            "one run directory; allowed: hydra.run.dir=<a folder every process can reach>"
        )
    if (
        explicit is not None
        and not resuming
        and (place is None or place.rank == 0)  # rank 0's own .hydra may already be there
        and _holds_a_run(explicit)
    ):
        raise RunExists(
            f"hydra.run.dir={explicit} already holds a run; resume it with "
            f"`contrast resume {explicit}` or choose a new directory"
        )
    # Sweepers optimise the returned k-NN accuracy: Optuna must maximise it, not minimise.
    if "hydra/sweeper=optuna" in args and not any(
        a.startswith("hydra.sweeper.direction") for a in args
    ):
        args = [*args, "hydra.sweeper.direction=maximize"]
    sys.argv = ["contrast train", *args]
    # One line per problem, exit 2, before Hydra creates a run directory; rank 0 announces the run.
    check_command_line(sys.argv[1:], _announce if place is None or place.rank == 0 else None)
    staging = None
    if place is not None and place.rank > 0:  # rank 0 alone writes the run directory
        sys.argv.append("hydra.output_subdir=null")
    elif explicit is not None and resuming and os.path.lexists(explicit / ".hydra" / "config.yaml"):
        # Resuming a run in place: Hydra writes its .hydra files before any of our checks,
        # so it writes them elsewhere; the run keeps its saved config, as `contrast resume`.
        staging = Path(tempfile.mkdtemp(prefix="contrast-hydra-"))
        sys.argv.append(f"hydra.output_subdir={staging}")
    try:
        _train_task()
    except Interrupted as e:  # run.py has logged how to continue
        return e.exit_code
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    return 0

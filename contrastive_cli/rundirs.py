"""Reading run directories back: config, choices, overrides, results, metrics.

A run directory is whatever holds ``.hydra/config.yaml``; no database is needed.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from contrastive_cli.errors import ConfigError, UserError
from contrastive_cli.untrusted import printable

CONFIG = Path(".hydra") / "config.yaml"  # complete and resolved
INTERPOLATED = Path(".hydra") / "config_unresolved.yaml"  # the same, interpolations kept


MAX_CONFIG_BYTES = 1 << 20  # a saved config is a few kB; a larger one is not ours


def read_config_file(path: Path, root: Path | None = None) -> Any:
    """A YAML file of a run directory, as OmegaConf; one ConfigError line for anything
    that is not a small, plain YAML document: not a regular file (a link, FIFO, device or
    folder), over 1 MiB, not UTF-8, malformed, nested too deeply, or using aliases (a few
    bytes expanding into gigabytes) or tags (see ``contrastive_cli.untrusted``). ``root``:
    the run directory, inside which no path component may be a link."""
    from contrastive_cli.untrusted import check_yaml, read_text

    text = read_text(path, "config", root)
    check_yaml(text, str(path))
    try:
        return OmegaConf.create(text)
    except Exception as e:  # yaml.YAMLError, OmegaConf's errors
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"{path} is not a valid config file ({printable(reason)[:200]})"
        ) from None


def _problem_in_results(results: Any) -> str | None:
    """Why a parsed results.json cannot be shown, or None when its fields have usable types."""
    if not isinstance(results, dict):
        return "not a JSON object"
    if not isinstance(results.get("status", ""), str):
        return "status is not a string"
    for section in ("metrics",):
        value = results.get(section)
        if value is not None and not (
            isinstance(value, dict) and all(_is_number(v) for v in value.values())
        ):
            return f"{section} is not a mapping of numbers"
    baselines = results.get("baselines")
    if baselines is not None and not (
        isinstance(baselines, dict)
        and all(
            isinstance(m, dict) and all(_is_number(v) for v in m.values())
            for m in baselines.values()
        )
    ):
        return "baselines is not a mapping of metric mappings"
    for key in ("wall_time_s", "train_time_s", "eval_time_s", "images_per_s"):
        if key in results and not _is_number(results[key]):
            return f"{key} is not a number"
    for key in ("epochs", "steps", "epoch", "seed"):
        if key in results and results[key] is not None and not isinstance(results[key], int):
            return f"{key} is not an integer"
    return None


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _with_new_settings(cfg: DictConfig) -> DictConfig:
    """A run saved by an older contrast lacks settings added since (``trainer.devices``...):
    they get the shipped defaults of ``conf/config.yaml``, which keep the old behaviour."""
    from contrastive_cli.config import CONF_DIR

    root = OmegaConf.load(CONF_DIR / "config.yaml")
    for section in ("trainer", "eval", "optim"):
        shipped, saved = root.get(section), cfg.get(section)
        if not isinstance(shipped, DictConfig) or not isinstance(saved, DictConfig):
            continue
        for key in shipped:
            if key not in saved.keys():  # noqa: SIM118 - `in saved` would resolve values
                saved[key] = shipped[key]
    return cfg


def _without_destinations(cfg: DictConfig) -> None:
    """Nothing from a run directory decides where contrast writes: a saved ``data.cache_dir``
    (where a folder's decoded cache goes) is dropped; the command line may set it again."""
    data = cfg.get("data") if "data" in cfg.keys() else None  # noqa: SIM118 - no resolving
    if isinstance(data, DictConfig) and "cache_dir" in data.keys():  # noqa: SIM118
        data.cache_dir = None
        source = data.get("source") if "source" in data.keys() else None  # noqa: SIM118
        if isinstance(source, DictConfig) and "cache_dir" in source.keys():  # noqa: SIM118
            source.cache_dir = None


def read_results(path: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(results, None), or (None, why it is unreadable); (None, None) when there is none.
    Read through ``contrastive_cli.untrusted``: a regular file of at most 1 MiB, plain JSON
    with finite numbers of sane size."""
    from contrastive_cli.untrusted import Missing, UntrustedFile, read_json

    try:
        results = read_json(path, "json", root=path.parent)
    except Missing:
        return None, None
    except UntrustedFile as e:
        return None, str(e).replace(str(path), "results.json", 1)
    problem = _problem_in_results(results)
    return (None, f"results.json: {problem}") if problem else (results, None)


@dataclass
class Run:
    path: Path
    choices: dict[str, str] = field(default_factory=dict)  # config group -> option
    overrides: list[str] = field(default_factory=list)  # command-line overrides
    results: dict[str, Any] | None = None
    problem: str | None = None  # why part of the run directory cannot be read

    def config(self, interpolated: bool = False) -> DictConfig:
        """The saved config in struct mode (typos stay errors), checked as data: only the
        ``_target_``s contrast ships for each slot, no resolver but ``oc.env`` (see
        ``contrastive_cli.safety``). Resolved by default: what the run did. ``interpolated``:
        with interpolations kept, so that an override such as ``data.path=...`` reaches the
        keys that follow it (``data.source.path``)."""
        from contrastive_cli.safety import check_loaded

        path = self.path / (
            INTERPOLATED if interpolated and os.path.lexists(self.path / INTERPOLATED) else CONFIG
        )
        cfg = _with_new_settings(check_loaded(read_config_file(path, self.path), str(path)))
        _without_destinations(cfg)
        OmegaConf.set_struct(cfg, True)
        return cfg

    @property
    def status(self) -> str:
        if self.problem is not None:
            return "unreadable"
        if self.results is not None:
            return str(self.results.get("status", "unknown"))
        log = self.path / "train.log"
        if log.exists() and time.time() - log.stat().st_mtime < 120:
            return "running"
        return "incomplete"

    @property
    def started(self) -> datetime:
        try:
            return datetime.fromtimestamp((self.path / CONFIG).stat().st_mtime)
        except OSError:  # a dangling link: sorts first, shown as unreadable
            return datetime.fromtimestamp(0)

    def metrics(self) -> list[dict[str, Any]]:
        from contrastive_cli.report import read_metrics

        path = self.path / "metrics.jsonl"
        return read_metrics(path, root=self.path) if os.path.lexists(path) else []


def load_run(path: Path) -> Run:
    """The run directory at ``path``. Its side files (hydra.yaml, overrides.yaml,
    results.json) are read leniently: a damaged one leaves ``problem`` set and the rest
    usable; the config itself is read when asked for (``Run.config``)."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise ConfigError(f"RUN_DIR={path}: no such folder")
    if not os.path.lexists(path / CONFIG):
        raise ConfigError(
            f"RUN_DIR={path}: not a run directory (no {CONFIG}); `contrast runs` lists them"
        )
    problems: list[str] = []
    choices: dict[str, str] = {}
    hydra_file = path / ".hydra" / "hydra.yaml"
    if os.path.lexists(hydra_file):
        try:
            raw = OmegaConf.select(read_config_file(hydra_file, path), "hydra.runtime.choices")
            raw = OmegaConf.to_container(raw, resolve=False) if raw is not None else {}
            choices = {
                str(k): str(v)
                for k, v in raw.items()
                if not str(k).startswith("hydra/") and isinstance(v, (str, int, float))
            }
        except (ConfigError, ValueError, AttributeError) as e:
            problems.append(str(e))
    overrides: list[str] = []
    overrides_file = path / ".hydra" / "overrides.yaml"
    if os.path.lexists(overrides_file):
        try:
            loaded = read_config_file(overrides_file, path)
            if not isinstance(loaded, ListConfig):
                raise ConfigError(f"{overrides_file} is not a list of overrides")
            overrides = [str(o) for o in OmegaConf.to_container(loaded, resolve=False)]
        except ConfigError as e:
            problems.append(str(e))
    results, problem = read_results(path / "results.json")
    if problem:
        problems.append(problem)
    return Run(
        path=path,
        choices=choices,
        overrides=overrides,
        results=results,
        problem="; ".join(problems) or None,
    )


# Tracker stores under a runs tree: MLflow keeps a copy of each run directory's files as
# artifacts (outputs/mlartifacts/<experiment>/<run id>/artifacts/...), which is no run.
TRACKER_STORES = frozenset({"mlartifacts", "mlruns"})


def find_runs(roots: Iterable[Path]) -> list[Run]:
    """Every run directory at or under ``roots`` (a run, a sweep, or a whole tree), not
    counting the copies inside tracker stores (``TRACKER_STORES``)."""
    seen: dict[Path, Run] = {}
    for root in roots:
        root = Path(root).expanduser()
        if not root.exists():
            raise UserError(f"{root} does not exist")
        for config in sorted(root.rglob(str(CONFIG))):
            if TRACKER_STORES & set(config.relative_to(root).parts):
                continue
            run_dir = config.parent.parent
            key = run_dir.resolve()
            if key not in seen:
                try:
                    seen[key] = load_run(run_dir)
                except UserError as e:  # listed as unreadable; the rest of the tree still shows
                    seen[key] = Run(path=run_dir, problem=str(e))
    return sorted(seen.values(), key=lambda r: (r.started, str(r.path)))

"""Reading run directories back: config, choices, overrides, results, metrics.

A run directory is whatever holds ``.hydra/config.yaml``; no database is needed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from contrastive_cli.errors import ConfigError, UserError

CONFIG = Path(".hydra") / "config.yaml"  # complete and resolved
INTERPOLATED = Path(".hydra") / "config_unresolved.yaml"  # the same, interpolations kept


@dataclass
class Run:
    path: Path
    choices: dict[str, str] = field(default_factory=dict)  # config group -> option
    overrides: list[str] = field(default_factory=list)  # command-line overrides
    results: dict[str, Any] | None = None

    def config(self, interpolated: bool = False) -> DictConfig:
        """The saved config in struct mode (typos stay errors). Resolved by default: what the
        run did. ``interpolated``: with interpolations kept, so that an override such as
        ``data.path=...`` reaches the keys that follow it (``data.source.path``)."""
        path = self.path / (
            INTERPOLATED if interpolated and (self.path / INTERPOLATED).is_file() else CONFIG
        )
        cfg = OmegaConf.load(path)
        OmegaConf.set_struct(cfg, True)
        return cfg  # type: ignore[return-value]

    @property
    def status(self) -> str:
        if self.results is not None:
            return str(self.results.get("status", "unknown"))
        log = self.path / "train.log"
        if log.exists() and time.time() - log.stat().st_mtime < 120:
            return "running"
        return "incomplete"

    @property
    def started(self) -> datetime:
        return datetime.fromtimestamp((self.path / CONFIG).stat().st_mtime)

    def metrics(self) -> list[dict[str, Any]]:
        path = self.path / "metrics.jsonl"
        if not path.exists():
            return []
        return [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]


def load_run(path: Path) -> Run:
    path = Path(path).expanduser()
    if not path.is_dir():
        raise ConfigError(f"RUN_DIR={path}: no such folder")
    if not (path / CONFIG).is_file():
        raise ConfigError(
            f"RUN_DIR={path}: not a run directory (no {CONFIG}); `contrast runs` lists them"
        )
    choices: dict[str, str] = {}
    hydra_file = path / ".hydra" / "hydra.yaml"
    if hydra_file.is_file():
        hydra_cfg = OmegaConf.load(hydra_file)
        raw = OmegaConf.to_container(hydra_cfg.hydra.runtime.choices, resolve=False) or {}
        choices = {
            k: str(v) for k, v in raw.items() if not k.startswith("hydra/") and v is not None
        }
    overrides_file = path / ".hydra" / "overrides.yaml"
    overrides = [str(o) for o in OmegaConf.load(overrides_file)] if overrides_file.is_file() else []
    results_file = path / "results.json"
    results = None
    if results_file.is_file():
        try:
            results = json.loads(results_file.read_text())
        except json.JSONDecodeError:
            results = {"status": "unreadable"}
    return Run(path=path, choices=choices, overrides=overrides, results=results)


def find_runs(roots: Iterable[Path]) -> list[Run]:
    """Every run directory at or under ``roots`` (a run, a sweep, or a whole tree)."""
    seen: dict[Path, Run] = {}
    for root in roots:
        root = Path(root).expanduser()
        if not root.exists():
            raise UserError(f"{root} does not exist")
        for config in sorted(root.rglob(str(CONFIG))):
            run_dir = config.parent.parent
            seen.setdefault(run_dir.resolve(), load_run(run_dir))
    return sorted(seen.values(), key=lambda r: (r.started, str(r.path)))

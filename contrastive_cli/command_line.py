"""The command line of ``contrast train``, checked before Hydra starts, so that a bad config
leaves no run directory: Hydra's own override errors (unknown key, unknown option,
unparsable value) become one ConfigError line each, and the composed config is validated
(``contrastive_cli.validate``). Also ``check_output_dir``, for a directory a key names."""

from __future__ import annotations

import difflib
import functools
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from contrastive_cli.config import CONF_DIR, OVERLAYS
from contrastive_cli.errors import ConfigError, UserError, raise_all
from contrastive_cli.validate import (
    _help_hint,
    _show,
    _suggest,
    nearest_key,
    validate,
    value_problems,
)

# --------------------------------------------------------------------------- command line
_HYDRA_FLAGS = ("-m", "--multirun")
# Hydra's own command-line flags (``contrast train --hydra-help``): left to Hydra.
_HYDRA_VALUE_FLAGS = (
    "-c", "--cfg", "-p", "--package", "-cp", "--config-path", "-cn", "--config-name",
    "-cd", "--config-dir", "-sc", "--shell-completion", "--experimental-rerun", "-i", "--info",
)  # fmt: skip
_HYDRA_OTHER_FLAGS = ("-h", "--help", "--hydra-help", "--version", "--resolve", "-r", "--run")
MAX_PRECHECKED_JOBS = 256


def check_command_line(
    args: Sequence[str], announce: Callable[[DictConfig], None] | None = None
) -> None:
    """Compose the config ``contrast train <args>`` would run and validate it, before Hydra
    creates a run directory. Every problem of the command line is reported at once, one
    line each (ConfigErrors): options and flags it does not know (``--epochs 2`` is shown as
    ``trainer.epochs=2``), unknown keys with the nearest known one, bad values. Typos are
    found without importing torch (about a second); the objects' own arguments after.
    Sweeps (-m): every job's overrides must compose; values are validated per job as it
    starts, so one bad job does not stop the others. Hydra's own flags (--help, --cfg, ...)
    and ``debug=true`` are left to Hydra as they are. ``announce(cfg)`` is called once the
    names and plain values are right, before torch loads (the first line a run prints).
    """
    _check_config_name(args)
    args, problems = _foreign_flags(list(args))
    if any(a.startswith("-") and a not in _HYDRA_FLAGS for a in args):
        raise_all(problems)
        return
    multirun = any(a in _HYDRA_FLAGS for a in args)
    overrides = [a for a in args if a not in _HYDRA_FLAGS]
    parsed, unparsable = _parse_each(overrides)
    problems += unparsable
    if any(
        o.key_or_group == "debug" and str(o.value()).lower() == "true"
        for o in parsed
        if not o.is_sweep_override()
    ):
        raise_all(problems)
        return
    if not multirun:
        problems += [
            f"{o.input_line} is a sweep; add -m to run one job per value "
            "(or quote it, key='a,b', to pass it as a string)"
            for o in parsed
            if o.is_sweep_override()
        ]
        problems += _override_problems(parsed)
        if problems:  # and the plain values of the overrides that do apply
            good = [o.input_line for o in parsed if not _named_in(o.input_line, problems)]
            cfg = _compose_quietly(good)
            if cfg is not None:
                problems += value_problems(_without_hydra(cfg), torch_free=True)
            raise_all(problems)
        cfg = _compose(overrides)
        check_output_dir(cfg, "hydra.run.dir")
        validate(cfg, torch_free=True)  # the plain sections' values, before torch loads
        if announce is not None:
            announce(cfg)
        validate(cfg)
        return
    raise_all(problems)
    jobs = _sweep_jobs(parsed)
    for job in jobs or []:
        try:
            cfg = _compose(job)
        except ConfigError as e:
            raise ConfigError(f"sweep job `{' '.join(job)}`: {e}") from None
    if jobs:
        check_output_dir(cfg, "hydra.sweep.dir")


def _flag_value(args: Sequence[str], *names: str) -> str | None:
    for i, a in enumerate(args):
        for name in names:
            if a == name and i + 1 < len(args):
                return args[i + 1]
            if a.startswith(name + "="):
                return a.split("=", 1)[1]
    return None


def _check_config_name(args: Sequence[str]) -> None:
    """``--config-name X`` must name a config in the config folder (``--config-dir`` or
    contrast's own), else Hydra prints a multi-line error and its search path."""
    name = _flag_value(args, "--config-name", "-cn")
    if name is None:
        return
    folder = Path(_flag_value(args, "--config-dir", "-cd") or CONF_DIR).expanduser()
    stem = name[:-5] if name.endswith(".yaml") else name
    if not (folder / f"{stem}.yaml").is_file():
        found = sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []
        raise ConfigError(
            f"--config-name={name} is not allowed: no {stem}.yaml in {folder}; allowed: "
            f"{', '.join(found) or '(no configs there)'}"
        )


def _parse_each(overrides: list[str]) -> tuple[list, list[str]]:
    """(the overrides Hydra can parse, one problem for each it cannot)."""
    parsed, problems = [], []
    for text in overrides:
        try:
            parsed += _parse([text])
        except ConfigError as e:
            problems.append(str(e))
    return parsed, problems


def _named_in(override: str, problems: list[str]) -> bool:
    key = override.partition("=")[0]
    return any(p.startswith((override, key.lstrip("+~"), f"'{override}'")) for p in problems)


def _without_hydra(cfg: DictConfig) -> DictConfig:
    cfg = cfg.copy()
    with open_dict(cfg):
        cfg.pop("hydra", None)
    return cfg


def _is_group(name: str) -> bool:
    from contrastive_cli.config import config_groups

    return "/" in name or name in config_groups() or name in OVERLAYS


def _override_problems(parsed: list) -> list[str]:
    """Unknown options of config groups and unknown keys, each with the nearest known one,
    found by composing the group choices alone (no torch): ``loss=ntxnet``,
    ``trainer.epoch=2``, ``loss.temprature=0.1`` in one command line are three problems."""
    from contrastive_cli.config import config_groups

    groups = config_groups(overlays=True)
    problems: list[str] = []
    chosen: list[str] = []
    for o in parsed:
        name = str(o.key_or_group)
        if not _is_group(name) or o.is_sweep_override():
            continue
        value = o.value()
        values = value if isinstance(value, list) else [value]
        options = groups.get(name)
        bad = [v for v in values if isinstance(v, str) and options and v not in options]
        if name in OVERLAYS and not o.is_add() and not o.is_delete():
            continue  # experiment=x without +: _compose explains it
        if bad:
            near = difflib.get_close_matches(bad[0], options, n=1)
            plus = "+" if o.is_add() else ""
            hint = f" (did you mean {plus}{name}={near[0]}?)" if near else ""
            problems.append(
                f"{o.input_line} is not allowed: no such option{hint}; "
                f"allowed: {', '.join(options)}"
            )
        else:
            chosen.append(o.input_line)
    base = _compose_quietly(chosen)
    if base is None:
        return problems
    for o in parsed:
        name = str(o.key_or_group)
        if _is_group(name) or o.is_add() or o.is_force_add() or o.is_sweep_override():
            continue
        if not _node_exists(base, name) and _is_kwarg(base, name):
            problems.append(
                f"{name} is not allowed: no such setting yet; allowed: +{o.input_line} (keyword "
                f"arguments under {name.rpartition('.')[0]} are added with +)"
            )
        elif not _node_exists(base, name):
            problems.append(
                f"{name} is not allowed: no such setting{_suggest(base, name)}; {_help_hint(name)}"
            )
    return problems


def _is_kwarg(cfg: DictConfig, key: str) -> bool:
    """``key`` is a new key of a ``kwargs`` mapping (passed through to a library)."""
    parent = key.rpartition(".")[0]
    return parent.endswith("kwargs") and _node_exists(cfg, parent)


def _node_exists(cfg: DictConfig, key: str) -> bool:
    """``key`` names a key of ``cfg`` (no value is resolved)."""
    node: Any = cfg
    for part in key.split("."):
        if isinstance(node, DictConfig) and part in node.keys():  # noqa: SIM118
            node = node._get_node(part)
        elif isinstance(node, ListConfig) and part.isdigit() and int(part) < len(node):
            node = node._get_node(int(part))
        else:
            return False
    return True


def _foreign_flags(args: list[str]) -> tuple[list[str], list[str]]:
    """(args without flags Hydra does not know, one problem each): ``--epochs 2`` is not how
    contrast takes settings, so the line shows the override that means it,
    ``trainer.epochs=2``. A flag's value is the next argument unless it has ``=``."""
    rest: list[str] = []
    problems: list[str] = []
    base: DictConfig | None = None
    i = 0
    while i < len(args):
        arg = args[i]
        flag = arg.split("=", 1)[0]
        if not arg.startswith("--") or flag in (
            *_HYDRA_FLAGS,
            *_HYDRA_VALUE_FLAGS,
            *_HYDRA_OTHER_FLAGS,
        ):
            rest.append(arg)
            if flag in _HYDRA_VALUE_FLAGS and "=" not in arg and i + 1 < len(args):
                rest.append(args[i + 1])
                i += 1
            i += 1
            continue
        if "=" in arg:
            value: str | None = arg.split("=", 1)[1]
        elif i + 1 < len(args) and not args[i + 1].startswith("-") and "=" not in args[i + 1]:
            value = args[i + 1]
            i += 1
        else:
            value = None
        i += 1
        base = base if base is not None else _compose_quietly([])
        shown = f"{arg} {value}" if value is not None and "=" not in arg else arg
        problems.append(_flag_problem(flag, value, shown, base))
    return rest, problems


def _flag_problem(flag: str, value: str | None, shown: str, base: DictConfig | None) -> str:
    from contrastive_cli.config import config_groups

    name = flag.lstrip("-").replace("-", "_")
    written = value if value is not None else "<value>"
    if name in config_groups() or name in OVERLAYS:
        key = f"+{name}" if name in OVERLAYS else name
    elif base is not None and _node_exists(base, name):
        key = name
    else:
        key = nearest_key(base, name) if base is not None else None
    if key is None:
        return (
            f"{shown} is not an option of contrast train: settings are given as key=value "
            f"(e.g. trainer.epochs=2); `contrast train --help` lists them"
        )
    return (
        f"{shown} is not an option of contrast train: settings are given as key=value; "
        f"allowed: {key}={written}"
    )


def _parse(overrides: list[str]) -> list:  # list[Override]
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    parsed = []
    for text in overrides:
        try:
            parsed += parser.parse_overrides([text])
        except OverrideParseException as e:
            lines = [
                ln.strip()
                for ln in str(e).splitlines()
                if ln.strip() and not ln.strip().startswith(("See https", "^"))
            ]
            detail = lines[-1] if lines else "cannot parse it"
            if not text.isascii():
                key, _, value = text.partition("=")
                raise ConfigError(
                    f"{text!r} is not a valid override: unquoted values must be ASCII; allowed: "
                    f"quote the value, {key}='{value}' (in a shell: \"{key}='{value}'\")"
                ) from None
            raise ConfigError(
                f"{text!r} is not a valid override ({detail}); allowed: key=value, "
                "e.g. trainer.epochs=20 or eval.knn_k=[200,20]"
            ) from None
    return parsed


def _sweep_jobs(parsed: list) -> list[list[str]] | None:
    """Each job's overrides, as Hydra's basic sweeper will run them (None: leave it to Hydra)."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper

    if any(str(o.key_or_group).startswith("hydra/sweeper") for o in parsed):
        return None
    try:
        [batch] = BasicSweeper.split_arguments(parsed, None)
    except Exception:  # a sweep type only another sweeper understands
        return None
    return batch if len(batch) <= MAX_PRECHECKED_JOBS else None


def compose_with_hydra(overrides: Sequence[str]) -> DictConfig:
    """The config ``contrast train <overrides>`` runs, with its ``hydra`` node (for the run dir)."""
    from hydra import compose, initialize_config_dir

    from contrastive_cli.config import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=True)


def _compose(overrides: list[str]) -> DictConfig:
    """``compose_with_hydra``, with each Hydra or OmegaConf error as one ConfigError line."""
    from hydra.errors import MissingConfigException, OverrideParseException

    from contrastive_cli.config import config_groups

    try:
        return compose_with_hydra(overrides)
    except MissingConfigException as e:
        missing = (e.missing_cfg_file or "").rsplit("/", 1)
        if e.options is not None and len(missing) == 2:
            raise ConfigError(
                f"{missing[0]}={missing[1]} is not allowed: no such option; allowed: {', '.join(e.options)}"
            ) from None
        raise ConfigError(_flatten(e)) from None
    except OverrideParseException as e:
        raise ConfigError(f"{e.override!r} is not a valid override ({_flatten(e)})") from None
    except (
        Exception
    ) as e:  # ConfigCompositionException, OmegaConf errors, odd overrides Hydra trips on
        match = re.match(r"Could not override '([^']+)'", str(e))
        if match and match.group(1) in OVERLAYS:
            key = match.group(1)
            given = next(o for o in overrides if o.startswith(f"{key}="))
            raise ConfigError(
                f"{given} is not allowed: an {key} is a whole recipe applied on top of the "
                f"defaults; allowed: +{given}"
            ) from None
        if match:
            key = match.group(1)
            base = _compose_quietly(
                [o for o in overrides if not o.lstrip("+~").startswith(f"{key}=")]
            )
            near = _suggest(base, key) if base is not None else ""
            raise ConfigError(
                f"{key} is not allowed: no such setting{near}; add it with +{key}=... only "
                "if its _target_ takes it (see `contrast train --cfg job`)"
            ) from None
        # the override without which the rest composes (none if several interact)
        culprit = next(
            (
                o
                for i, o in enumerate(overrides)
                if len(overrides) == 1
                or _compose_quietly(overrides[:i] + overrides[i + 1 :]) is not None
            ),
            None,
        )
        group = (culprit or "").partition("=")[0]
        options = config_groups().get(group)
        if options:  # a group set to something that is not an option name (null, 3, [..], ${..})
            raise ConfigError(
                f"{culprit} is not allowed; allowed: {group}=<option>, one of {', '.join(options)}"
            ) from None
        raise ConfigError(
            f"{culprit or ' '.join(overrides)!r} cannot be applied: {_flatten(e)}"
        ) from None


def _compose_quietly(overrides: list[str]) -> DictConfig | None:
    """The config, or None where it does not compose; remembered for the checks of one
    command line, which compose the same overrides more than once (read it, never change it)."""
    return _composed(tuple(overrides))


@functools.lru_cache(maxsize=8)
def _composed(overrides: tuple[str, ...]) -> DictConfig | None:
    try:
        return compose_with_hydra(overrides)
    except Exception:
        return None


def _flatten(e: BaseException) -> str:
    skip = (
        "Set the environment variable",
        "See https",
        "Config search path",
        "provider=",
        "full_key:",
        "object_type=",
    )
    lines = [ln.strip() for ln in str(e).splitlines()]
    text = " ".join(ln for ln in lines if ln and not ln.startswith(skip))
    return text or type(e).__name__


def check_output_dir(cfg: DictConfig, key: str) -> None:
    """The run directory Hydra will create must be creatable: one line if it is not.

    The path is not resolved (a resolver such as ``unique_dir`` creates directories): its
    literal part, up to the first interpolation, is checked, which covers the usual case of
    a run directory under a file or a read-only folder.
    """
    subdir = OmegaConf.select(cfg, "hydra.output_subdir", throw_on_resolution_failure=False)
    if not isinstance(subdir, str) or not subdir.strip():
        raise ConfigError(
            f"hydra.output_subdir={_show(subdir)} is not allowed; allowed: a folder name such as "
            ".hydra (a run directory keeps its config there for resume and reproduce)"
        )
    parent_key, _, leaf = key.rpartition(".")
    parent = OmegaConf.select(cfg, parent_key, throw_on_resolution_failure=False)
    # Not `leaf in parent`: OmegaConf's `in` resolves the value, and resolving unique_dir
    # would claim a directory here, before Hydra claims its own.
    node = (
        parent._get_node(leaf, throw_on_missing_key=False)
        if isinstance(parent, DictConfig)
        else None
    )
    if node is None:
        return
    raw = str(node._value()) if node._value() is not None else ""
    if not raw.strip():
        raise ConfigError(
            f"{key}={_show(node._value())} is not allowed; allowed: a folder path (the default "
            "makes a new folder under outputs/ for every run)"
        )
    while re.match(r"\$\{[\w.]+:", raw):  # ${resolver:path...}: the path is the argument
        raw = re.sub(r"^\$\{[\w.]+:", "", raw)
    literal = raw.split("${")[0]
    path = Path(literal or ".").expanduser().absolute()
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    why = None
    if not existing.is_dir():
        why = f"{existing} is not a folder"
    elif not os.access(existing, os.W_OK | os.X_OK):
        why = f"{existing} is not writable"
    if why:
        shown = raw if raw == literal else f"{literal}..."
        raise UserError(f"cannot create the run directory {shown} ({key}): {why}")

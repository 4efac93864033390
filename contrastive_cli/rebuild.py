"""A run directory's config, rebuilt from the package's own ``conf/``: its files are data.

A saved config is never composed, resolved or instantiated as it stands: interpolation
reaches around any check of its ``_target_``s (a payload under a node the check skips,
referenced from an ``_args_`` item; a resolver name built by interpolation). So:

1. every file read from a run directory, and a weights file's metadata, is refused in one
   line if it holds ``${``, or a Hydra instantiation key (``_target_``, ``_args_``,
   ``_partial_``...) where contrast's own configs have none; YAML tags and aliases are
   refused when the file is read (``rundirs.read_config_file``);
2. the run's recorded overrides (``.hydra/overrides.yaml``) are checked one by one as
   values: a group must name a shipped option, no key may be an instantiation key (a
   ``_target_`` only with a name allowed in that slot), a value must be plain data;
3. the config is composed from ``conf/`` and those overrides, and the group choices are
   read from that composition (never from ``hydra.yaml``);
4. the saved ``config.yaml`` and ``hydra.yaml``'s choices are compared with the result,
   key by key: a difference is refused in one line naming the key.

Trackers never take a destination from a run directory: a recorded
``tracker.mlflow.tracking_uri`` is dropped, the current command line and environment decide.
"""

from __future__ import annotations

import copy
import functools
import re
from collections.abc import Iterator, Sequence
from typing import Any

from omegaconf import DictConfig, OmegaConf, open_dict

from contrastive_cli.confdir import CONF_DIR, config_groups
from contrastive_cli.errors import ConfigError
from contrastive_cli.safety import EXTRA_ENV, allowed_targets

SPECIAL_KEY = re.compile(r"^_\w*_$")  # _target_, _args_, _partial_, _recursive_, _convert_
# Keys a run's record may not decide for whoever reads it: where things are (data.root comes
# from the reader's environment), whether this command resumes, and where tracking goes.
NOT_COMPARED = ("data.root", "data.cache_dir", "data.source.cache_dir", "trainer.resume", "tracker")
# Defaults a shipped config had before: a run that saved one of them kept the default then,
# and is rebuilt with today's (eval.metrics before the low-shot, retrieval and label-free
# evaluators: `contrast eval` of such a run computes them too).
FORMER_DEFAULTS: dict[str, tuple[Any, ...]] = {"eval.metrics": (["knn", "linear"],)}
# Never taken from a run directory: where tracking goes, where a folder's decoded cache goes.
DESTINATIONS = ("tracker.mlflow.tracking_uri", "data.cache_dir")


def _shown(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@functools.cache
def shipped_special_keys() -> frozenset[str]:
    """Dotted paths of every instantiation key the shipped configs hold (``encoder._target_``,
    ``optim.optimizer._partial_``...): the only places a saved config may have one."""
    found: set[str] = set()

    def walk(node: Any, prefix: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                if isinstance(key, str) and SPECIAL_KEY.match(key):
                    found.add(f"{prefix}{key}")
                walk(value, f"{prefix}{key}.")

    root = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "config.yaml"), resolve=False)
    walk({k: v for k, v in root.items() if k not in ("hydra", "defaults")}, "")
    for path in sorted(CONF_DIR.rglob("*.yaml")):
        group = path.parent.relative_to(CONF_DIR).as_posix()
        if group != "." and not group.startswith(("hydra", "experiment")):
            node = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
            walk(node, group.replace("/", ".") + ".")
    return frozenset(found)


def _leaves(node: Any, prefix: str = "") -> Iterator[tuple[str, Any, Any]]:
    """(dotted path, key, value) of every key and item of a plain container, depth first."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield f"{prefix}{key}", key, value
            yield from _leaves(value, f"{prefix}{key}.")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield f"{prefix}{i}", None, value
            yield from _leaves(value, f"{prefix}{i}.")


def check_plain(data: Any, source: str, special_allowed: frozenset[str] = frozenset()) -> None:
    """ConfigError unless ``data`` (a plain container from a run-directory file or metadata)
    is data: no ``${`` in any key or string, no instantiation key outside ``special_allowed``
    (dotted paths), nothing but mappings, lists, strings, numbers, booleans and nulls."""
    for path, key, value in _leaves(data):
        if key is not None and not isinstance(key, str | int):
            raise ConfigError(
                f"{source}: key {_shown(key)} at {path} is not allowed; allowed: names"
            )
        for text in (key, value):
            if isinstance(text, str) and "${" in text:
                raise ConfigError(
                    f"{path}={_shown(value)} in {source} is not allowed: files that come with a "
                    "run are data, never interpolated (${...}); allowed: plain values"
                )
        if isinstance(key, str) and SPECIAL_KEY.match(key) and path not in special_allowed:
            raise ConfigError(
                f"{path} in {source} is not allowed: {key} makes Hydra import and call code; "
                f"allowed: plain values (a run's objects are rebuilt from contrast's own conf/)"
            )
        if not isinstance(value, dict | list | str | int | float | bool | type(None)):
            raise ConfigError(
                f"{path} in {source} holds a {type(value).__name__}, which is not allowed; "
                "allowed: mappings, lists, strings, numbers, booleans, null"
            )


def check_override(override: Any, source: str) -> None:
    """ConfigError unless one parsed override (Hydra's ``Override``) from a run directory is a
    value: a group set to shipped options, or a setting set to plain data; never a sweep,
    Hydra's own settings, a package, or an instantiation key (a ``_target_`` only with a
    name allowed in that slot, e.g. through CONTRAST_EXTRA_TARGETS)."""
    line = override.input_line
    key = str(override.key_or_group)
    groups = config_groups(overlays=True)
    if override.is_sweep_override():
        raise ConfigError(f"{line!r} in {source} is not allowed: a run's override is one value")
    if key == "hydra" or key.startswith(("hydra.", "hydra/")) or override.package:
        raise ConfigError(
            f"{line!r} in {source} is not allowed; allowed: group=option and key=value "
            "overrides of contrast's own settings"
        )
    value = override.value()
    if key in groups:
        options = groups[key]
        chosen = value if isinstance(value, list) else [value]
        if key == "tracker" and value is None:
            return
        if not all(isinstance(c, str) and c in options for c in chosen):
            raise ConfigError(
                f"{line!r} in {source} is not allowed: {key} must name shipped options; "
                f"allowed: {', '.join(options)}"
            )
        return
    parts = key.split(".")
    for i, part in enumerate(parts):
        if not SPECIAL_KEY.match(part):
            continue
        slot = ".".join(parts[:i])
        allowed = allowed_targets().get(slot, frozenset())
        if part == "_target_" and i == len(parts) - 1 and value in allowed:
            break
        raise ConfigError(
            f"{line!r} in {source} is not allowed: {part} makes Hydra import and call code; "
            + (
                f"allowed: {slot}._target_= one of {', '.join(sorted(allowed))} (own code on "
                f"this machine: {EXTRA_ENV}={slot}=module.callable)"
                if part == "_target_" and allowed
                else "allowed: plain settings"
            )
        )
    check_plain(value, f"{source} ({line})")


def _parse(overrides: Sequence[str], source: str) -> list[Any]:
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    parsed = []
    for text in overrides:
        if not isinstance(text, str) or "${" in text:
            raise ConfigError(
                f"{_shown(text)} in {source} is not allowed: a run's overrides are plain values, "
                "never interpolated (${...})"
            )
        try:
            parsed += parser.parse_overrides([text])
        except Exception as e:  # OverrideParseException, and anything the grammar trips on
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(f"{text!r} in {source} is not an override ({first[:160]})") from None
    return parsed


@functools.lru_cache(maxsize=64)
def _composed(overrides: tuple[str, ...]) -> tuple[DictConfig, tuple[tuple[str, Any], ...]]:
    """The job config of ``overrides`` from conf/, and its group choices (cached: a sweep's
    runs share most of them; callers get a copy)."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.singleton import Singleton

    from contrastive_cli.command_line import compose_with_hydra

    # Inside a running Hydra app (a sweep's end-of-sweep table reads its runs), Hydra's global
    # state is the app's: set it aside while composing, and put it back.
    running = Singleton._instances.pop(GlobalHydra, None)
    try:
        cfg = compose_with_hydra(list(overrides))
    finally:
        if running is not None:
            Singleton._instances[GlobalHydra] = running
    choices = OmegaConf.to_container(cfg.hydra.runtime.choices, resolve=False)
    choices = {k: v for k, v in choices.items() if not str(k).startswith("hydra/")}
    with open_dict(cfg):
        cfg.pop("hydra")
    return cfg, tuple(sorted(choices.items()))


def rebuild(overrides: Sequence[str], source: str) -> tuple[DictConfig, dict[str, str], list[str]]:
    """(config, group choices, the overrides used) of a run whose recorded overrides are
    ``overrides``: each checked as a value, then composed with contrast's own conf/.
    Destinations (``DESTINATIONS``) are dropped: they come from the reader's command line
    and environment."""
    parsed = _parse(overrides, source)
    used = []
    for override, text in zip(parsed, overrides, strict=True):
        check_override(override, source)
        if str(override.key_or_group) not in DESTINATIONS:
            used.append(text)
    try:
        cfg, choices = _composed(tuple(used))
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    except Exception as e:  # Hydra's composition errors: an option or key this conf/ lacks
        first = " ".join(str(e).split())[:200] or type(e).__name__
        raise ConfigError(
            f"{source} does not compose with this contrast's conf/ ({first})"
        ) from None
    cfg = copy.deepcopy(cfg)
    OmegaConf.set_struct(cfg, True)
    return cfg, {str(k): str(v) for k, v in choices if v is not None}, used


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    """{dotted key: value} of a plain container's leaves (lists are values)."""
    if isinstance(node, dict) and node:
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: node}


def _compared(key: str) -> bool:
    return not any(key == k or key.startswith(k + ".") for k in NOT_COMPARED)


def compare(saved: Any, cfg: DictConfig, source: str) -> DictConfig:
    """``cfg`` (the rebuilt config), once the saved config agrees with it: every saved key is a
    setting of ``cfg`` with the same value (keys in ``NOT_COMPARED`` aside). The one decision
    a run records beyond its overrides: the epochs a ``trainer.time_budget`` fixed (saved as
    ``trainer.epochs`` with no budget), taken when it is a positive integer."""
    if not isinstance(saved, dict):
        raise ConfigError(f"{source} is not a config mapping")
    trainer = saved.get("trainer") if isinstance(saved.get("trainer"), dict) else {}
    budget_fixed = (
        cfg.trainer.get("time_budget") is not None
        and "time_budget" in trainer
        and trainer["time_budget"] is None
    )
    if budget_fixed:
        epochs = trainer.get("epochs")
        if not (isinstance(epochs, int) and not isinstance(epochs, bool) and epochs > 0):
            raise ConfigError(
                f"trainer.epochs={_shown(epochs)} in {source} is not allowed; allowed: the "
                "positive number of epochs its trainer.time_budget fixed"
            )
        with open_dict(cfg):
            cfg.trainer.epochs, cfg.trainer.time_budget = epochs, None
    # Compared as on the machine that made the run: its data.root (from its environment)
    # flows into the keys that refer to it (data.source.root), so they are set from the file.
    probe = copy.deepcopy(cfg)
    root = (saved.get("data") or {}).get("root") if isinstance(saved.get("data"), dict) else None
    if isinstance(root, str) and "data" in probe and "root" in probe.data:
        with open_dict(probe):
            probe.data.root = root
    try:
        rebuilt = _flat(OmegaConf.to_container(probe, resolve=True))
    except Exception as e:  # an interpolation of our own conf/ that does not resolve
        raise ConfigError(f"{source}: the rebuilt config does not resolve ({e})") from None
    for key, value in _flat(saved).items():
        if not _compared(key):
            continue
        if key not in rebuilt:
            raise ConfigError(
                f"{key} in {source} is not allowed: no such setting in the config that the "
                "run's overrides and contrast's conf/ give"
            )
        former = any(_same(value, v) for v in FORMER_DEFAULTS.get(key, ()))
        if not _same(value, rebuilt[key]) and not former:
            raise ConfigError(
                f"{key}={_shown(value)} in {source} is not allowed: the run's overrides and "
                f"contrast's conf/ give {_shown(rebuilt[key])} (a saved config is compared, "
                "never used)"
            )
    return cfg


def _same(a: Any, b: Any) -> bool:
    """Equal values of the same kind (1 and 1.0 alike; True and 1 not)."""
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    numbers = (int, float)
    if (
        isinstance(a, bool)
        or isinstance(b, bool)
        or not (isinstance(a, numbers) and isinstance(b, numbers))
    ):
        return type(a) is type(b) and a == b
    return a == b


def compare_choices(recorded: Any, choices: dict[str, str], source: str) -> None:
    """``hydra.yaml``'s recorded group choices must be the rebuilt ones (they are never used)."""
    if recorded is None:
        return
    if not isinstance(recorded, dict):
        raise ConfigError(f"hydra.runtime.choices in {source} is not a mapping")
    check_plain(recorded, source)
    for group, option in recorded.items():
        if str(group).startswith("hydra/") or group == "tracker":  # tracking: not what it did
            continue
        if (None if option is None else str(option)) != choices.get(str(group)):
            raise ConfigError(
                f"{group}={_shown(option)} in {source} is not allowed: the run's overrides and "
                f"contrast's conf/ give {group}={choices.get(str(group))}"
            )


def metadata_encoder(encoder: Any, source: str) -> DictConfig:
    """The encoder config of a weights file's metadata, rebuilt: the shipped encoder option
    whose ``_target_`` the metadata names (its ``_target_`` and structure come from conf/),
    with the metadata's other keys set as checked plain values. A ``_target_`` no option
    has is taken only when this machine's user allows it (CONTRAST_EXTRA_TARGETS)."""
    if not isinstance(encoder, dict) or not isinstance(encoder.get("_target_"), str):
        raise ConfigError(f"{source}: metadata encoder is not a JSON object with a _target_")
    values = {k: v for k, v in encoder.items() if k != "_target_"}
    check_plain(values, f"{source} (metadata encoder)")
    target = encoder["_target_"]
    options = {}
    for path in sorted((CONF_DIR / "encoder").glob("*.yaml")):
        option_target = OmegaConf.load(path).get("_target_")
        options.setdefault(option_target, path.stem)
    allowed = allowed_targets().get("encoder", frozenset())
    if target not in options and target not in allowed:
        raise ConfigError(
            f"encoder._target_={_shown(target)} in the metadata of {source} is not allowed; "
            f"allowed: {', '.join(sorted(allowed))} (own code on this machine: "
            f"{EXTRA_ENV}=encoder=module.callable)"
        )
    if target not in options:  # the user's own encoder, allowed on this machine
        return OmegaConf.create({"_target_": target, **values})
    node = _composed((f"encoder={options[target]}",))[0].encoder
    node = OmegaConf.create(OmegaConf.to_container(node, resolve=True))
    OmegaConf.set_struct(node, True)
    for key, value in values.items():
        if key not in node:
            raise ConfigError(
                f"encoder.{key} in the metadata of {source} is not allowed: no such setting of "
                f"encoder={options[target]}; allowed: {', '.join(k for k in node if k != '_target_')}"
            )
        node[key] = value
    return node


ENV_KEPT = ("data.root",)  # a path, not a secret: the comparison needs it (data.source.root)


def saved_config(cfg: DictConfig) -> str:
    """The YAML of ``.hydra/config.yaml``: ``cfg`` resolved, except that a value read from the
    environment (``${oc.env:NAME}``, a token in a tracking URI...) is written as where it came
    from, never as itself. ``data.root`` excepted (a path the comparison needs)."""
    import yaml

    resolved = OmegaConf.to_container(cfg, resolve=True)
    raw = _flat(OmegaConf.to_container(cfg, resolve=False))
    for key, value in raw.items():
        if isinstance(value, str) and "oc.env:" in value and key not in ENV_KEPT:
            *parents, last = key.split(".")
            node = resolved
            for part in parents:
                node = node[int(part)] if isinstance(node, list) else node[part]
            names = ", ".join(re.findall(r"oc\.env:\s*([\w.]+)", value))
            node[last] = f"(not recorded: read from the environment, {names})"
    return yaml.safe_dump(resolved, sort_keys=False, allow_unicode=True)

"""Composing the package's configs outside the command line (tests, resume), building
objects from them, and applying a command's overrides to a run's config."""

from __future__ import annotations

import copy
import os
from collections.abc import Sequence
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

# Re-exported: callers import these from here.
from contrastive_cli.confdir import CONF_DIR, OVERLAYS, config_dir, config_groups  # noqa: F401
from contrastive_cli.errors import ConfigError
from contrastive_cli.safety import check_buildable


def claim_directory(path: str) -> str:
    """Create and return a directory no other run has: ``path``, else ``path-2``, ``path-3``...

    ``mkdir`` without ``exist_ok`` is atomic, so two runs started in the same second (or
    parallel sweep jobs on a shared filesystem) never share a directory. Registered as the
    cached resolver ``unique_dir`` used by ``hydra.run.dir`` and ``hydra.sweep.dir``; Hydra
    copies resolver caches into each job's config, so a sweep's jobs agree on the name.
    """
    base = Path(path)
    candidate, n = base, 1
    while True:
        try:
            candidate.mkdir(parents=True, exist_ok=False)
            return str(candidate)
        except FileExistsError:
            n += 1
            candidate = base.with_name(f"{base.name}-{n}")


if not OmegaConf.has_resolver("unique_dir"):
    OmegaConf.register_new_resolver("unique_dir", claim_directory, use_cache=True)


def compose(overrides: Sequence[str] = ()) -> DictConfig:
    """The job config ``contrast train <overrides>`` would run (without the hydra section)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hydra_compose(
            config_name="config", overrides=list(overrides), return_hydra_config=False
        )


def build(node: DictConfig, *args: object, **kwargs: object):
    """``hydra.utils.instantiate``, but an error the user can fix comes through as itself
    (Hydra wraps everything raised inside a target in an InstantiationException)."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    from contrastive_cli.errors import UserError

    check_buildable(node)
    try:
        return instantiate(node, *args, **kwargs)
    except InstantiationException as e:
        if isinstance(e.__cause__, UserError):
            raise e.__cause__ from None
        raise


def expand_home(override: str) -> str:
    """``key=~/photos`` -> ``key=/home/me/photos``. Shells leave a ``~`` after ``=`` alone and
    Hydra's override grammar rejects it, so without this the obvious command fails to parse."""
    key, sep, value = override.partition("=")
    if sep and value.startswith("~") and not key.startswith("~"):
        return f"{key}={os.path.expanduser(value)}"
    return override


def apply_overrides(
    run_cfg: DictConfig,
    overrides: Sequence[str],
    groups_allowed: Sequence[str],
    keys_allowed: tuple[str, ...],
    command: str,
) -> DictConfig:
    """The run's config with ``overrides`` applied as ``contrast train`` would: ``group=option``
    swaps in that option's config, ``key=value`` sets a key that must exist (struct mode).
    Only ``groups_allowed`` may be switched and keys starting with ``keys_allowed`` set:
    the encoder always stays the run's."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType
    from hydra.errors import OverrideParseException

    try:
        parsed = OverridesParser.create().parse_overrides([expand_home(o) for o in overrides])
    except OverrideParseException as e:
        raise ConfigError(f"cannot parse the override: {str(e).strip().splitlines()[0]}") from None
    cfg = copy.deepcopy(run_cfg)
    groups = config_groups()
    for o in parsed:
        key = o.key_or_group
        if (
            o.type != OverrideType.CHANGE
            or o.is_sweep_override()
            or not (key in groups_allowed or key.startswith(keys_allowed))
        ):
            allowed = [f"{g}=..." for g in groups_allowed] + [
                f"{k}..." if k.endswith(".") else f"{k}=..." for k in keys_allowed
            ]
            raise ConfigError(
                f"{o.input_line}: {command} takes only {', '.join(allowed)} (the encoder is the run's)"
            )
        if key in groups_allowed:
            option = o.value()
            if option not in groups[key]:
                raise ConfigError(
                    f"{key}={option} is not an option; options: {', '.join(groups[key])}"
                )
            with open_dict(cfg):
                cfg[key] = compose([f"{key}={option}"])[key]
        else:
            try:
                OmegaConf.update(cfg, key, o.value(), merge=False)
            except Exception as e:  # struct mode: a key that does not exist
                raise ConfigError(
                    f"{o.input_line}: {key} is not a setting of data={cfg.data.get('name')} "
                    f"({type(e).__name__})"
                ) from None
    return cfg

"""Which callables a config may name: the allowlist of ``_target_``s per object slot.

Hydra's ``instantiate`` imports and calls whatever a ``_target_`` names. Every config that is
built (the command line's, and a run's config once ``contrastive_cli.rebuild`` has rebuilt it
from the package's own conf/) is checked here first: every ``_target_`` must sit in an object
slot of the shipped configs (``encoder``, ``loss.projector``, ``data.source``, ...), be a
plain name (never interpolated), and name a callable that some shipped option puts in that
slot, or one the user allowed for that slot on this machine (``CONTRAST_EXTRA_TARGETS``, see
``extra_targets``). A ``_target_`` anywhere else, such as inside a mapping placed where a
plain value belongs (``device.type``), is refused.

Files from a run directory never reach this check as they stand: they are data, refused
before anything else if they hold ``${``, a YAML tag or an instantiation key
(``contrastive_cli.rebuild``). Nothing here imports a target; the checks look at strings only.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterator
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from contrastive_cli.confdir import CONF_DIR
from contrastive_cli.errors import ConfigError

EXTRA_ENV = "CONTRAST_EXTRA_TARGETS"


def _slots(node: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """(slot, raw ``_target_`` value) of every node holding a ``_target_``; the slot is the
    node's dotted path (list items by index)."""
    if isinstance(node, DictConfig):
        if "_target_" in node.keys():  # noqa: SIM118 - `in node` would resolve the value
            raw = node._get_node("_target_")
            if isinstance(raw, (DictConfig, ListConfig)):
                yield prefix.rstrip("."), raw  # not a name: refused by the caller
            else:
                yield prefix.rstrip("."), raw._value() if hasattr(raw, "_value") else raw
        for key in node:
            yield from _slots(node._get_node(key), f"{prefix}{key}.")
    elif isinstance(node, ListConfig):
        for i in range(len(node)):
            yield from _slots(node._get_node(i), f"{prefix}{i}.")


@functools.cache
def shipped_targets() -> dict[str, frozenset[str]]:
    """{slot: the targets shipped options put there}, read from the package's conf/."""
    found: dict[str, set[str]] = {}
    root = OmegaConf.load(CONF_DIR / "config.yaml")
    with_prefix: list[tuple[str, Any]] = [
        ("", OmegaConf.masked_copy(root, [k for k in root if k not in ("hydra", "defaults")]))
    ]
    for path in sorted(CONF_DIR.rglob("*.yaml")):  # every option, and the bases they extend
        group = path.parent.relative_to(CONF_DIR).as_posix()
        if group != "." and not group.startswith("hydra"):
            with_prefix.append((group.replace("/", ".") + ".", OmegaConf.load(path)))
    for prefix, cfg in with_prefix:
        for slot, target in _slots(cfg, prefix):
            found.setdefault(slot, set()).add(str(target))
    return {slot: frozenset(targets) for slot, targets in found.items()}


def extra_targets() -> dict[str, frozenset[str]]:
    """Targets this machine's user allows besides the shipped ones, for their own encoders,
    methods, optimizers...: ``CONTRAST_EXTRA_TARGETS="encoder=mypkg.nets.Wide,loss=mypkg.M"``
    (comma-separated ``slot=dotted.path``). An environment variable, never a file a run
    directory could carry."""
    extra: dict[str, set[str]] = {}
    for item in os.environ.get(EXTRA_ENV, "").split(","):
        if not item.strip():
            continue
        slot, sep, target = item.strip().partition("=")
        if not sep or not slot or not re.fullmatch(r"[A-Za-z_][\w]*(\.[A-Za-z_]\w*)+", target):
            raise ConfigError(
                f"{EXTRA_ENV} item {item.strip()!r} is not allowed; allowed: slot=module.callable, "
                "e.g. encoder=mypkg.nets.Wide (comma-separated)"
            )
        extra.setdefault(slot, set()).add(target)
    return {slot: frozenset(t) for slot, t in extra.items()}


def allowed_targets() -> dict[str, frozenset[str]]:
    allowed = dict(shipped_targets())
    for slot, targets in extra_targets().items():
        allowed[slot] = allowed.get(slot, frozenset()) | targets
    return allowed


def check_targets(cfg: DictConfig, source: str = "the config") -> None:
    """ConfigError unless every ``_target_`` in ``cfg`` is allowed in its slot (see the
    module docstring). An interpolated target is refused, never resolved (it could show a
    secret from the environment in the message). A ``hydra`` node (Hydra's own
    settings, present when the command line is checked) is Hydra's and skipped."""
    allowed = allowed_targets()
    keys = list(cfg)  # `"hydra" in cfg` would resolve it (and its run-dir resolver)
    job = OmegaConf.masked_copy(cfg, [k for k in keys if k != "hydra"]) if "hydra" in keys else cfg
    for slot, raw in _slots(job):
        target = raw
        shown = f"{slot}._target_" if slot else "_target_"
        if isinstance(raw, str) and "${" in raw:  # never resolved: it could show a secret
            raise ConfigError(
                f"{shown}={raw[:80]!r} in {source} is not allowed: a _target_ is never "
                "interpolated; allowed: the dotted name of a callable contrast ships for that slot"
            )
        if not isinstance(target, str):
            raise ConfigError(
                f"{shown} in {source} is not allowed: it holds a {type(target).__name__}; "
                "allowed: the dotted name of a callable contrast ships for that slot"
            )
        if slot not in allowed:
            raise ConfigError(
                f"{shown}={target!r} in {source} is not allowed: {slot or 'the top level'} is a "
                f"setting, not an object; allowed: a _target_ only under {', '.join(sorted(allowed))}"
            )
        if target not in allowed[slot]:
            raise ConfigError(
                f"{shown}={target!r} in {source} is not allowed; allowed: "
                f"{', '.join(sorted(allowed[slot]))} (own code on this machine: "
                f"{EXTRA_ENV}={slot}=module.callable)"
            )


def check_buildable(node: Any) -> None:
    """The last check before Hydra imports anything: every target in ``node`` is allowed in
    some slot (``check_targets`` has checked each one's slot; this guards every build call,
    whatever path a config took to get there)."""
    if not isinstance(node, (DictConfig, ListConfig)):
        return
    everything = frozenset().union(*allowed_targets().values())
    for slot, _ in _slots(node):
        target = OmegaConf.select(node, f"{slot}._target_" if slot else "_target_")
        if not isinstance(target, str) or target not in everything:
            raise ConfigError(
                f"{(slot + '.') if slot else ''}_target_={target!r} is not allowed: not a callable "
                f"that contrast ships (own code on this machine: {EXTRA_ENV}=slot=module.callable)"
            )

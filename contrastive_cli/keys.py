"""The config's setting keys, and the known key nearest to a typo: what a one-line error
suggests (``validate`` and ``command_line`` both use it)."""

from __future__ import annotations

import difflib
from typing import Any

from omegaconf import DictConfig

_SECTION_ORDER = ("trainer", "data", "encoder", "loss", "optim", "eval", "device", "tracker")


def _help_hint(key: str) -> str:
    """Where to read the settings near ``key``, in the words of the command line."""
    section = key.lstrip("+~").split(".")[0].split("/")[0]
    if section not in _SECTION_ORDER or "." not in key:
        return "`contrast train --help` lists the settings"
    return f"`contrast train --help {section}` lists its settings"


def setting_keys(cfg: DictConfig) -> list[str]:
    """Every leaf key of ``cfg`` as dotted paths, without resolving any value."""

    def keys(node: Any, prefix: str) -> list[str]:
        if not isinstance(node, DictConfig):
            return [prefix[:-1]]
        return [k for name in node for k in keys(node._get_node(name), f"{prefix}{name}.")]

    return keys(cfg, "")


def nearest_key(cfg: DictConfig, key: str) -> str | None:
    """The setting a user most likely meant by ``key``: one with the same last part
    (``epochs`` -> ``trainer.epochs``), else the closest spelling of the whole key or of its
    last part. Hydra's own settings only for keys under ``hydra.``."""
    key = key.lstrip("+~")
    known = [
        k
        for k in setting_keys(cfg)
        if k != key
        and (key.startswith("hydra.") or not k.startswith("hydra."))
        and "._" not in k  # not _target_, _partial_: how objects are built, not settings
    ]
    leaf = key.rsplit(".", 1)[-1]
    same_leaf = [k for k in known if k.rsplit(".", 1)[-1] == leaf]
    if same_leaf:  # the section a person sets most often first: trainer.epochs, not data.epochs
        rank = {s: i for i, s in enumerate(_SECTION_ORDER)}
        return min(same_leaf, key=lambda k: (k.count("."), rank.get(k.split(".")[0], 99)))
    close = difflib.get_close_matches(key, known, n=1)
    if close:
        return close[0]
    leaves = {k.rsplit(".", 1)[-1]: k for k in reversed(known)}
    close = difflib.get_close_matches(leaf, list(leaves), n=1, cutoff=0.75)
    return leaves[close[0]] if close else None


def _suggest(cfg: DictConfig, key: str) -> str:
    near = nearest_key(cfg, key)
    return f" (did you mean {near}?)" if near else ""

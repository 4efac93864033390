"""Check a run's config before any work starts: every failure is one ConfigError line.

``validate(cfg)`` checks, in order:

1. every ``_target_`` against the allowlist of its slot (``contrastive_cli.safety``);
2. every value against its type (``contrastive_cli.schema``): the annotation of the
   constructor parameter it is passed to, or the field of a section schema (``trainer``,
   ``eval``, ...); a key that is neither is unknown, with the nearest known key suggested;
3. the combinations in ``COMBINATIONS`` (MoCo queue vs batch, warmup vs epochs, ...);
4. the objects themselves: the device exists, the augmentation runs on a dummy batch, and
   encoder, method, optimizer and schedule build from the config, the encoder on a dummy
   input of the configured image shape, all on PyTorch's ``meta`` device (no memory).

``check_command_line`` runs before Hydra starts (so a bad config leaves no run directory):
it turns Hydra's own override errors into one line too. ``check_data`` covers what is only
known once the data is loaded.
"""

from __future__ import annotations

import difflib
import functools
import os
import re
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from contrastive_cli.config import CONF_DIR, OVERLAYS
from contrastive_cli.errors import ConfigError, UserError, raise_all
from contrastive_cli.safety import _slots
from contrastive_cli.schema import REQUIRED_IN, is_plain, problem, section_types, target_types

if TYPE_CHECKING:
    from contrastive_cli.data.datasets import ImageData

# Hydra's instantiation keys, in any object node.
HYDRA_KEYS = {
    "_target_": str,
    "_partial_": bool,
    "_recursive_": bool,
    "_convert_": typing.Literal["none", "partial", "object", "all"],
    "_args_": list,
}
# What the code reads directly, besides the required sections' fields.
REQUIRED_NODES = ("data.name", "data.channels", "data.image_size", "data.source", "data.augment")


# --------------------------------------------------------------------------- validate
def validate(cfg: DictConfig, torch_free: bool = False) -> None:
    """Raise ConfigError (one line: key, value, what is allowed) for a bad setting; every bad
    value and key at once (ConfigErrors), then the first bad combination or object.

    ``torch_free``: only what needs no import of torch (the plain sections: trainer, eval,
    optim.lr, data...; objects' arguments need their classes' annotations), so a typo is
    reported in about a second."""
    if not torch_free:
        from contrastive_cli.safety import check_targets

        check_targets(cfg)
    problems = value_problems(cfg, torch_free)
    raise_all(problems)
    if torch_free:
        return
    raise_all([message for combination in COMBINATIONS if (message := combination(cfg))])
    _check_objects(cfg)


def value_problems(cfg: DictConfig, torch_free: bool = False) -> list[str]:
    """Every bad or unknown key and value of ``cfg``, and every required one missing."""
    problems: list[str] = []
    _walk(cfg, cfg, "", problems, torch_free)
    for section in REQUIRED_IN:
        node = OmegaConf.select(cfg, section, throw_on_resolution_failure=False) if section else cfg
        if not isinstance(node, DictConfig):  # not a section at all: reported by _walk
            continue
        for key, tp in (section_types(section) or {}).items():
            if key not in node.keys() and problem(None, tp):  # noqa: SIM118 (no resolving)
                problems.append(_missing(f"{section}.{key}".lstrip("."), tp))
    for key in REQUIRED_NODES:
        if not _has(cfg, key):
            problems.append(_missing(key, None))
    return problems


def _walk(
    cfg: DictConfig, node: DictConfig, prefix: str, problems: list[str], torch_free: bool
) -> None:
    """Check every key under ``node`` against its type, resolving values one by one; a node
    (a section, an object) is walked in turn unless a plain value belongs there. Each bad
    key goes to ``problems``; ``torch_free`` leaves objects (``_target_`` nodes) out."""
    if torch_free and "_target_" in node.keys():  # noqa: SIM118 - no resolving
        return
    for key in node:
        try:
            _check_key(cfg, node, prefix, str(key), problems, torch_free)
        except ConfigError as e:
            problems.append(str(e))


def _check_key(
    cfg: DictConfig,
    node: DictConfig,
    prefix: str,
    key: str,
    problems: list[str],
    torch_free: bool,
) -> None:
    """One key of ``node``: its type, its value, and the keys under it (``_walk``)."""
    full = f"{prefix}{key}"
    if full == "hydra":
        return
    expected = _expected(cfg, node, prefix.rstrip("."), str(key))
    child = node._get_node(key)
    raw = str(child._value()) if child is not None and child._is_interpolation() else ""
    try:
        value = node[key]
    except MissingMandatoryValue:
        raise ConfigError(f"{full} has no value (???); allowed: set it, {full}=...") from None
    except OmegaConfBaseException as e:
        what = f"{full}={raw}" if raw else full
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"{what} cannot be resolved ({reason}); allowed: a value, or ${{key}} of an existing key"
        ) from None
    if isinstance(value, DictConfig) and not is_plain(expected):
        _walk(cfg, value, f"{full}.", problems, torch_free)
    elif allowed := problem(_plain(value), expected):
        source = f" (from {raw})" if raw else ""
        raise ConfigError(
            f"{full}={_show(_plain(value))}{source} is not allowed; allowed: {allowed}"
        )


def _expected(cfg: DictConfig, node: DictConfig, path: str, key: str) -> Any:
    """The type of ``path.key``: from the constructor of the object ``node`` builds, or from
    the schema of the section ``path``; ConfigError for a key that is neither."""
    full = f"{path}.{key}".lstrip(".")
    if "_target_" in node.keys():  # noqa: SIM118 - `in node` would resolve the value
        if key in HYDRA_KEYS:
            return HYDRA_KEYS[key]
        target = str(node._get_node("_target_")._value())
        params = target_types(target)
        if params is None or key in params or "**" in params:
            return (params or {}).get(key, Any)
        names = ", ".join(p for p in params if p not in ("self", "**"))
        value = _show(_plain(node._get_node(key)._value()))
        raise ConfigError(
            f"{full}={value} is not allowed: {target} takes no '{key}'; allowed keys: {names}"
        )
    types = section_types(path)
    if types is not None and key in types:
        return types[key]
    if types is None and isinstance(node._get_node(key), DictConfig):
        return Any  # an object node in a container of them (tracker.mlflow)
    raise ConfigError(
        f"{full} is not allowed: contrast has no setting {full}{_suggest(cfg, full)}; "
        f"{_help_hint(full)}"
    )


def _has(cfg: DictConfig, key: str) -> bool:
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent, throw_on_resolution_failure=False) if parent else cfg
    return isinstance(node, DictConfig) and leaf in node.keys()  # noqa: SIM118 (no resolving)


def _missing(key: str, tp: Any) -> str:
    from contrastive_cli.config import config_groups

    options = config_groups().get(key)
    if options:
        allowed = f"{key}=<option>, one of {', '.join(options)}"
    else:
        allowed = f"{key}=<value>, as in `contrast train --cfg job`"
    return f"{key} is missing (deleted with ~{key}?); allowed: {allowed}"


# Sections in the order `contrast train --help` shows them (and a near key is chosen).
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


# --------------------------------------------------------------------------- combinations
def _get(cfg: DictConfig, key: str) -> Any:
    return OmegaConf.select(cfg, key)


def _queue_holds_a_step(cfg: DictConfig) -> str | None:
    queue, batch = _get(cfg, "loss.queue_size"), cfg.trainer.batch_size
    if queue is None:
        return None
    keys = batch * (2 if _get(cfg, "loss.symmetric") else 1)
    if queue < keys:
        why = f"trainer.batch_size={batch}" + (
            " x 2 with loss.symmetric=true" if keys > batch else ""
        )
        return f"loss.queue_size={queue} is not allowed; allowed: >= {keys}, the keys of one step ({why})"
    return None


def _labels_as_positives(cfg: DictConfig) -> str | None:
    # Rule chosen: with positives=labels a batch should hold about two samples of every class,
    # so batch_size >= 2 * data.num_classes (each sample's other view is always a positive too).
    # Without data.num_classes in the config, check_data applies it once the data is loaded.
    classes = _get(cfg, "data.num_classes")
    if _get(cfg, "loss.positives") != "labels" or classes is None:
        return None
    batch = cfg.trainer.batch_size
    if batch < 2 * classes:
        return (
            f"trainer.batch_size={batch} is not allowed with loss.positives=labels; allowed: "
            f">= {2 * classes} (2 x data.num_classes={classes}, several samples per class in a batch)"
        )
    return None


def _warmup_within_training(cfg: DictConfig) -> str | None:
    warmup, epochs = _get(cfg, "optim.scheduler.warmup_epochs"), cfg.trainer.epochs
    if warmup is not None and warmup > epochs:
        return f"optim.scheduler.warmup_epochs={warmup} is not allowed; allowed: a number in [0, {epochs}] (trainer.epochs)"
    return None


def _nesterov_needs_momentum(cfg: DictConfig) -> str | None:
    opt = cfg.optim.optimizer
    if opt.get("nesterov") and (opt.get("momentum", 0) <= 0 or opt.get("dampening", 0) != 0):
        return (
            "optim.optimizer.nesterov=true is not allowed with momentum "
            f"{opt.get('momentum', 0)} and dampening {opt.get('dampening', 0)}; allowed: momentum > 0, dampening 0"
        )
    return None


def _widths_match_strides(cfg: DictConfig) -> str | None:
    widths, strides = _get(cfg, "encoder.widths"), _get(cfg, "encoder.strides")
    if widths is not None and strides is not None and len(widths) != len(strides):
        return (
            f"encoder.strides={_show(_plain(strides))} is not allowed; allowed: one stride per width "
            f"({len(widths)}, encoder.widths={_show(_plain(widths))})"
        )
    return None


def _shape_is_the_datasets(cfg: DictConfig) -> str | None:
    """A built-in dataset's channels and image size are facts about its files; only a loader
    that converts images (one taking ``channels``/``image_size``, like data=folder) lets a
    user choose them. The shipped YAML of that dataset says what they are."""
    params = target_types(str(_get(cfg, "data.source._target_") or ""))
    shipped = CONF_DIR / "data" / f"{_get(cfg, 'data.name')}.yaml"
    if params is None or not shipped.is_file():
        return None
    default = OmegaConf.load(shipped)
    for key in ("channels", "image_size"):
        value, fixed = _get(cfg, f"data.{key}"), default.get(key)
        if key not in params and fixed is not None and value != fixed:
            return (
                f"data.{key}={value} is not allowed with data={cfg.data.name}; allowed: {fixed} "
                f"(its images are {default.channels}x{default.image_size}x{default.image_size})"
            )
    return None


def _batch_splits_over_devices(cfg: DictConfig) -> str | None:
    devices, batch = cfg.trainer.devices, cfg.trainer.batch_size
    if batch % devices:
        return (
            f"trainer.batch_size={batch} is not allowed with trainer.devices={devices}; allowed: "
            f"a multiple of {devices} (the batch is global, each process takes an equal slice)"
        )
    return None


@functools.cache
def _loss_targets() -> dict[str, str]:
    """{option: the method's dotted path} of every shipped ``conf/loss`` option."""
    folder = CONF_DIR / "loss"
    return {
        p.stem: str(OmegaConf.load(p).get("_target_", "")) for p in sorted(folder.glob("*.yaml"))
    }


def _method_class(cfg: DictConfig) -> Any:
    """The method class ``loss._target_`` names (allowed by now: safety ran first), or None."""
    from hydra.utils import get_object

    try:
        return get_object(str(_get(cfg, "loss._target_")))
    except Exception:
        return None


def _loss_choice(cfg: DictConfig) -> str:
    """``loss=<option>`` for a shipped method, else ``loss._target_=<path>``."""
    target = _get(cfg, "loss._target_")
    option = next((o for o, t in _loss_targets().items() if t == target), None)
    return f"loss={option}" if option else f"loss._target_={target}"


def _losses_where(attribute: str, value: bool) -> str:
    """The shipped loss options whose method class has ``attribute`` (default false) == value."""
    from hydra.utils import get_object

    return ", ".join(
        o
        for o, t in _loss_targets().items()
        if bool(getattr(get_object(t), attribute, False)) == value
    )


def _local_crops_need_a_method_that_uses_them(cfg: DictConfig) -> str | None:
    """Local crops cost a forward pass each; a method whose class does not declare
    ``uses_local_crops = True`` would ignore them, so they are refused rather than wasted."""
    crops = _get(cfg, "data.augment.local_crops")
    method = _method_class(cfg)
    if not crops or method is None or getattr(method, "uses_local_crops", False):
        return None
    return (
        f"data.augment.local_crops={crops} is not allowed with {_loss_choice(cfg)}, which trains on "
        f"the two global views only; allowed: 0, or a loss that uses local crops "
        f"(loss={_losses_where('uses_local_crops', True)})"
    )


COMBINATIONS: list[Callable[[DictConfig], str | None]] = [
    _local_crops_need_a_method_that_uses_them,
    _batch_splits_over_devices,
    _shape_is_the_datasets,
    _queue_holds_a_step,
    _labels_as_positives,
    _warmup_within_training,
    _nesterov_needs_momentum,
    _widths_match_strides,
]


# --------------------------------------------------------------------------- data, objects
def check_data(cfg: DictConfig, data: ImageData) -> None:
    """What can only be checked once the data is loaded (called right after loading)."""
    n, batch = len(data.pretrain), cfg.trainer.batch_size
    if n < 2:
        raise ConfigError(
            f"data={cfg.data.name} has {n} training image{'s' if n != 1 else ''}; contrastive "
            "training compares images within a batch, so it needs at least 2 "
            "(trainer.batch_size >= 2 images)"
        )
    if batch > n:
        raise ConfigError(
            f"trainer.batch_size={batch} is larger than the {n} training images of "
            f"data={cfg.data.name}; allowed: at most {n}"
        )
    if getattr(_method_class(cfg), "needs_labels", False) and data.pretrain.labels is None:
        raise ConfigError(
            f"{_loss_choice(cfg)} is not allowed: data={cfg.data.name} has no labels and this "
            f"loss trains on them; allowed: a loss that needs none (loss="
            f"{_losses_where('needs_labels', False)}) or labelled data"
        )
    if _get(cfg, "loss.positives") == "labels":
        if data.pretrain.labels is None:
            raise ConfigError(
                f"loss.positives=labels is not allowed: data={cfg.data.name} has no labels; allowed: views"
            )
        if batch < 2 * data.num_classes:
            raise ConfigError(
                f"trainer.batch_size={batch} is not allowed with loss.positives=labels; allowed: "
                f">= {2 * data.num_classes} (2 x the {data.num_classes} classes of data={cfg.data.name})"
            )


def _check_objects(cfg: DictConfig) -> None:
    """Build the device, augmentation, encoder, method, optimizer and schedule; only the
    device and augmentation for real, the rest on the meta device (shapes, no memory)."""
    import torch
    from hydra.errors import InstantiationException

    from contrastive_cli.config import build
    from contrastive_cli.models.encoders import output_shape

    def built(
        what: str, make: Callable[[], Any], problem: str = "cannot be built from this config"
    ) -> Any:
        try:
            return make()
        except UserError:
            raise
        except (
            InstantiationException,
            TypeError,
            ValueError,
            RuntimeError,
            AttributeError,
            ImportError,
        ) as e:
            raise ConfigError(f"{what} {problem}: {_reason(e)}") from None

    for slot, _ in _slots(cfg):  # allowed by now; one of one's own may still not import
        target = OmegaConf.select(cfg, f"{slot}._target_")
        if slot != "hydra" and not slot.startswith("hydra.") and target_types(target) is None:
            raise ConfigError(
                f"{slot}._target_={_show(target)} is not allowed; allowed: an importable "
                "Python callable"
            )
    c, size = cfg.data.channels, cfg.data.image_size
    built("device", lambda: build(cfg.device))
    if cfg.get("tracker"):  # a tracker whose package is missing: one line
        from contrastive_cli.tracking import build_trackers

        built("tracker", lambda: build_trackers(cfg, rank=0))
    augment = built("data.augment", lambda: build(cfg.data.augment))
    built(
        "data.augment",
        lambda: augment(
            torch.zeros(2, c, 8, 8, dtype=torch.uint8), torch.Generator().manual_seed(0)
        ),
        f"cannot take {c}-channel images (data.channels={c}; allowed: data.mean, data.std to match)",
    )
    with torch.device("meta"):
        encoder = built(
            f"encoder ({cfg.encoder._target_})",
            lambda: build(cfg.encoder, in_channels=c, image_size=size),
        )
        shape = built(
            f"encoder ({cfg.encoder._target_})",
            lambda: tuple(output_shape(encoder, c, size)),
            f"cannot take {c}x{size}x{size} images (data.channels={c}, data.image_size={size})",
        )
        if shape != (2, getattr(encoder, "out_dim", None)):
            raise ConfigError(
                f"encoder ({cfg.encoder._target_}) gives features of shape {shape[1:]} on "
                f"{c}x{size}x{size} images, not ({getattr(encoder, 'out_dim', '?')},)"
            )
        method = built(f"loss ({cfg.loss._target_})", lambda: build(cfg.loss, encoder=encoder))
        params = [p for p in method.parameters() if p.requires_grad]
        optimizer = built("optim.optimizer", lambda: build(cfg.optim.optimizer)(params))
        built(
            "optim.scheduler",
            lambda: build(cfg.optim.scheduler)(
                optimizer, steps_per_epoch=1, epochs=cfg.trainer.epochs
            ),
        )


def _reason(e: BaseException) -> str:
    cause = e.__cause__ if e.__cause__ is not None else e
    text = str(cause).strip()
    line = text.splitlines()[0] if text else type(cause).__name__
    return f"{type(cause).__name__}: {line[:300]}"


def _plain(value: Any) -> Any:
    return (
        OmegaConf.to_container(value, resolve=True)
        if isinstance(value, (DictConfig, ListConfig))
        else value
    )


def _show(value: Any) -> str:
    """A value as one would type it in an override (strings quoted, so '5' differs from 5)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_show(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_show(v)}" for k, v in value.items()) + "}"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


# --------------------------------------------------------------------------- command line
_HYDRA_FLAGS = ("-m", "--multirun")
# Hydra's own command-line flags (``contrast train --hydra-help``): left to Hydra.
_HYDRA_VALUE_FLAGS = (
    "-c", "--cfg", "-p", "--package", "-cp", "--config-path", "-cn", "--config-name",
    "-cd", "--config-dir", "-sc", "--shell-completion", "--experimental-rerun", "-i", "--info",
)  # fmt: skip
_HYDRA_OTHER_FLAGS = ("-h", "--help", "--hydra-help", "--version", "--resolve", "-r", "--run")
MAX_PRECHECKED_JOBS = 256


def check_command_line(args: Sequence[str]) -> None:
    """Compose the config ``contrast train <args>`` would run and validate it, before Hydra
    creates a run directory. Every problem of the command line is reported at once, one
    line each (ConfigErrors): options and flags it does not know (``--epochs 2`` is shown as
    ``trainer.epochs=2``), unknown keys with the nearest known one, bad values. Typos are
    found without importing torch (about a second); the objects' own arguments after.
    Sweeps (-m): every job's overrides must compose; values are validated per job as it
    starts, so one bad job does not stop the others. Hydra's own flags (--help, --cfg, ...)
    and ``debug=true`` are left to Hydra as they are.
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
        if not _node_exists(base, name):
            problems.append(
                f"{name} is not allowed: no such setting{_suggest(base, name)}; {_help_hint(name)}"
            )
    return problems


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

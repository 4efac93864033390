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

import functools
import typing
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from contrastive_cli.config import CONF_DIR
from contrastive_cli.errors import ConfigError, UserError, raise_all
from contrastive_cli.keys import _help_hint, _suggest, nearest_key, setting_keys  # noqa: F401
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
        extra = section_types(path) or {}  # encoder.weights...: read by the run, not passed
        if key in extra and (params is None or key not in params):
            return extra[key]
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


def _metrics_are_evaluators(cfg: DictConfig) -> str | None:
    from contrastive_cli.evaluators import unknown_metric

    return unknown_metric([str(m) for m in cfg.eval.metrics])


COMBINATIONS: list[Callable[[DictConfig], str | None]] = [
    _metrics_are_evaluators,
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
    from contrastive_cli.parts import encoder_node
    from contrastive_cli.starting import starting_weights

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
            lambda: build(encoder_node(cfg), in_channels=c, image_size=size),
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
        starting_weights(cfg, encoder)  # the file is there, readable and fits: before any run
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

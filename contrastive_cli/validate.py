"""Check a run's config before any work starts: every failure is one ConfigError line.

``validate(cfg)`` checks, in order:

1. every value against ``RULES``, a table of key pattern -> rule (type and range); a key
   that no rule covers must be a parameter of the ``_target_`` it is passed to;
2. the combinations in ``COMBINATIONS`` (MoCo queue vs batch, warmup vs epochs, ...);
3. the objects themselves: the device exists, and encoder, method, optimizer and schedule
   build from the config, the encoder on a dummy input of the configured image shape. They
   are built on PyTorch's ``meta`` device, so no weights are allocated, whatever the sizes.

Steps 1 and 2 do not import torch, so a mistyped value is reported in well under a second.
``check_command_line`` runs before Hydra starts (so a bad config leaves no run directory):
it turns Hydra's own override errors into one line too. ``check_data`` covers what is only
known once the data is loaded.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import inspect
import logging
import math
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

from contrastive_cli.config import CONF_DIR
from contrastive_cli.errors import ConfigError, UserError

if TYPE_CHECKING:
    from contrastive_cli.data.datasets import ImageData

log = logging.getLogger(__name__)


# --------------------------------------------------------------------------- rules
@dataclass(frozen=True)
class Rule:
    """``check(value)`` is True when the value is allowed; ``allowed`` says what is, in words."""

    check: Callable[[Any], bool]
    allowed: str


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _in_range(v: float, lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> bool:
    above = lo is None or (v > lo if lo_open else v >= lo)
    below = hi is None or (v < hi if hi_open else v <= hi)
    return above and below


def _range_words(lo: float | None, hi: float | None, lo_open: bool, hi_open: bool) -> str:
    if lo is not None and hi is not None:
        return f"in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    if lo is not None:
        return f"{'>' if lo_open else '>='} {lo:g}"
    if hi is not None:
        return f"{'<' if hi_open else '<='} {hi:g}"
    return ""


def integer(lo: int | None = None, hi: int | None = None) -> Rule:
    words = _range_words(lo, hi, False, False)
    return Rule(
        lambda v: _is_int(v) and _in_range(v, lo, hi, False, False), f"an integer {words}".strip()
    )


def number(
    lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False
) -> Rule:
    words = _range_words(lo, hi, lo_open, hi_open)
    return Rule(
        lambda v: _is_number(v) and _in_range(v, lo, hi, lo_open, hi_open),
        f"a number {words}".strip(),
    )


def optional(rule: Rule) -> Rule:
    """The rule, or null."""
    return Rule(lambda v: v is None or rule.check(v), f"null or {rule.allowed}")


def choice(*options: str) -> Rule:
    return Rule(lambda v: v in options and isinstance(v, str), f"one of {', '.join(options)}")


def list_of(item: Rule, min_len: int = 1, length: int | None = None) -> Rule:
    def check(v: object) -> bool:
        if not isinstance(v, list) or len(v) < min_len or (length is not None and len(v) != length):
            return False
        return all(item.check(x) for x in v)

    items = re.sub(
        r"\b(integer|number|string)\b", r"\1s", re.sub(r"^an? ", "", item.allowed), count=1
    )
    size = (
        f"a list of {length}"
        if length is not None
        else "a list of"
        if min_len == 0
        else "a non-empty list of"
    )
    return Rule(check, f"{size} {items}")


def interval(lo: float, hi: float | None, lo_open: bool = False) -> Rule:
    """[low, high] with lo (<) <= low <= high <= hi."""
    bound = number(lo, hi, lo_open=lo_open)

    def check(v: object) -> bool:
        return (
            isinstance(v, list) and len(v) == 2 and all(bound.check(x) for x in v) and v[0] <= v[1]
        )

    return Rule(check, f"[low, high] with low <= high, both {_range_words(lo, hi, lo_open, False)}")


BOOL = Rule(lambda v: isinstance(v, bool), "true or false")
TEXT = Rule(lambda v: isinstance(v, str) and v.strip() != "", "a non-empty string")
TEXTS = list_of(TEXT, min_len=0)
POSITIVE = number(0, lo_open=True)
NON_NEGATIVE = number(0)
PROBABILITY = number(0, 1)
FRACTION = number(0, 1, lo_open=True, hi_open=True)
NODE = Rule(lambda v: False, "a config node (keys under it), as in the shipped configs")


def _is_dotted_path(v: object) -> bool:
    return isinstance(v, str) and re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+", v) is not None


def _locate(path: str) -> Callable[..., Any] | None:
    """The callable at ``path`` (imports the longest module prefix), or None. Like Hydra's
    own lookup, without its error logging."""
    parts = path.split(".")
    for i in range(len(parts) - 1, 0, -1):
        try:
            found: Any = importlib.import_module(".".join(parts[:i]))
            for attr in parts[i:]:
                found = getattr(found, attr)
        except Exception:  # ImportError, AttributeError, errors raised while importing
            continue
        return found if callable(found) else None
    return None


# Syntax only here (no imports); check_objects imports every target.
TARGET = Rule(_is_dotted_path, "a dotted path to a Python callable (module.name)")

# Key patterns (fnmatch, first match wins) -> rule. Every key of every shipped config option
# has one (tests/test_validate.py checks); a key added with `+` that matches none must be a
# parameter of the `_target_` it goes to.
RULES: list[tuple[str, Rule]] = [
    # nodes: only reached when something other than a node was put there (trainer=3)
    *[
        (key, NODE)
        for key in (
            "trainer",
            "eval",
            "eval.probe",
            "data",
            "encoder",
            "loss",
            "optim",
            "device",
            "tracker",
            "tracker.mlflow",
            "tracker.tensorboard",
        )
    ],
    # trainer
    ("trainer.epochs", integer(1)),
    ("trainer.batch_size", integer(2)),  # contrastive losses need >= 2 samples per batch
    ("trainer.seed", integer(0, 2**63 - 1)),
    ("trainer.deterministic", BOOL),
    ("trainer.checkpoint", BOOL),
    ("trainer.resume", BOOL),
    ("trainer.log_every", integer(1)),
    ("trainer.grad_clip", NON_NEGATIVE),
    ("trainer.devices", integer(1, 1024)),
    ("trainer.sync_bn", BOOL),
    ("trainer.max_restarts", integer(0, 100)),
    ("optim.lr_scaling", choice("none", "linear", "sqrt")),
    ("optim.reference_batch", integer(1)),
    # evaluation
    ("eval.knn_k", list_of(integer(1))),
    ("eval.knn_temperature", POSITIVE),
    ("eval.probe.weight_decays", list_of(NON_NEGATIVE)),
    ("eval.probe.val_fraction", FRACTION),
    ("eval.probe.max_iter", integer(1)),
    ("eval.baselines", BOOL),
    ("eval.every", integer(0)),
    ("eval.monitor_bank", integer(1)),
    ("eval.monitor_queries", integer(1)),
    ("eval.batch_size", integer(1)),
    ("eval.plots", BOOL),
    ("eval.embedding_points", integer(0)),
    ("debug", BOOL),
    # data
    ("data.name", TEXT),
    ("data.root", TEXT),
    ("data.download", BOOL),
    ("data.channels", integer(1)),
    ("data.image_size", integer(1)),
    ("data.num_classes", integer(2)),
    ("data.epochs", integer(1)),
    # image folders and STL-10 (data=folder, data=stl10)
    ("data.path", optional(TEXT)),
    ("data.source.path", optional(TEXT)),
    ("data.eval_path", optional(TEXT)),
    ("data.source.eval_path", optional(TEXT)),
    ("data.test_fraction", FRACTION),
    ("data.cache", BOOL),
    ("data.source.cache", BOOL),
    ("data.cache_dir", optional(TEXT)),
    ("data.source.cache_dir", optional(TEXT)),
    ("data.workers", optional(integer(0))),
    ("data.source.workers", optional(integer(0))),
    ("data.extensions", list_of(TEXT)),
    ("data.source.extensions", list_of(TEXT)),
    ("data.max_pixels", integer(1)),
    ("data.source.max_pixels", integer(1)),
    ("data.pretrain_split", choice("unlabeled", "train", "train+unlabeled")),
    ("data.source.pretrain_split", choice("unlabeled", "train", "train+unlabeled")),
    ("data.source.image_size", integer(1)),
    ("data.source.channels", integer(1)),
    ("data.augment.channels", integer(1)),
    ("data.source", NODE),
    ("data.source.root", TEXT),
    ("data.source.download", BOOL),
    ("data.source.name", TEXT),
    ("data.source.folder", TEXT),
    ("data.source.url", Rule(lambda v: isinstance(v, str), "a string")),
    ("data.source.extra_dirs", TEXTS),
    ("data.source.train_files", list_of(TEXT)),
    ("data.source.test_files", list_of(TEXT)),
    ("data.source.label_key", TEXT),
    ("data.source.num_classes", integer(2)),
    ("data.source.test_fraction", FRACTION),
    ("data.source.split_seed", integer(0)),
    ("data.source.downloader", NODE),
    ("data.augment", NODE),
    ("data.mean", list_of(number())),
    ("data.augment.mean", list_of(number())),
    ("data.std", list_of(POSITIVE)),
    ("data.augment.std", list_of(POSITIVE)),
    ("data.augment.crop_scale", interval(0, 1, lo_open=True)),
    ("data.augment.crop_ratio", interval(0, None, lo_open=True)),
    ("data.augment.hflip", PROBABILITY),
    ("data.augment.rotate", number(0, 180)),
    ("data.augment.translate", number(0, 1)),
    ("data.augment.jitter_p", PROBABILITY),
    ("data.augment.brightness", NON_NEGATIVE),
    ("data.augment.contrast", NON_NEGATIVE),
    ("data.augment.saturation", NON_NEGATIVE),
    ("data.augment.hue", number(0, 0.5)),
    ("data.augment.grayscale_p", PROBABILITY),
    ("data.augment.blur_p", PROBABILITY),
    ("data.augment.blur_sigma", interval(0, None, lo_open=True)),
    ("data.augment.solarize_p", PROBABILITY),
    ("data.augment.local_crops", integer(0)),
    ("data.augment.local_crop_size", optional(integer(1))),
    ("data.augment.local_crop_scale", interval(0, 1, lo_open=True)),
    # encoder
    ("encoder.widths", list_of(integer(1))),
    ("encoder.strides", list_of(integer(1))),
    ("encoder.hidden_dims", list_of(integer(1))),
    ("encoder.stem", choice("auto", "small", "imagenet")),
    # loss (the method)
    ("loss.temperature", POSITIVE),
    ("loss.queue_size", integer(1)),
    ("loss.momentum", number(0, 1, hi_open=True)),
    ("loss.base_momentum", PROBABILITY),
    ("loss.out_dim", integer(1)),
    ("loss.projection_dim", integer(1)),
    ("loss.key_bn_splits", integer(1)),
    ("loss.symmetric", BOOL),
    ("loss.margin", NON_NEGATIVE),
    ("loss.mining", choice("hard", "semihard", "all")),
    ("loss.positives", choice("views", "labels")),
    ("loss.projector", NODE),
    ("loss.predictor", NODE),
    ("loss.*.hidden_dim", integer(1)),
    ("loss.*.out_dim", integer(1)),
    ("loss.*.batch_norm", BOOL),
    # methods added by issue 12
    ("loss.head", NODE),
    ("loss.expander", NODE),
    ("loss.*.layers", integer(1)),
    ("loss.*.output_batch_norm", BOOL),
    ("loss.*.bottleneck_dim", integer(1)),
    ("loss.*.norm_last_layer", BOOL),
    ("loss.lambda_offdiag", NON_NEGATIVE),
    ("loss.scale", POSITIVE),
    ("loss.sim_coeff", NON_NEGATIVE),
    ("loss.std_coeff", NON_NEGATIVE),
    ("loss.cov_coeff", NON_NEGATIVE),
    ("loss.center_momentum", number(0, 1, hi_open=True)),
    ("loss.student_temp", POSITIVE),
    ("loss.teacher_temp_start", POSITIVE),
    ("loss.teacher_temp_end", POSITIVE),
    ("loss.teacher_temp_warmup", PROBABILITY),
    ("loss.distance", choice("euclidean", "cosine")),
    # optimizer and schedule
    ("optim.optimizer", NODE),
    ("optim.scheduler", NODE),
    ("optim.lr", POSITIVE),
    ("optim.optimizer.lr", POSITIVE),
    ("optim.optimizer.weight_decay", NON_NEGATIVE),
    ("optim.optimizer.momentum", number(0, 1, hi_open=True)),
    ("optim.optimizer.dampening", PROBABILITY),
    ("optim.optimizer.nesterov", BOOL),
    ("optim.optimizer.betas", list_of(number(0, 1, hi_open=True), length=2)),
    ("optim.optimizer.eps", POSITIVE),
    ("optim.optimizer.amsgrad", BOOL),
    ("optim.optimizer.trust_coefficient", POSITIVE),
    ("optim.optimizer.clip_lr", BOOL),
    ("optim.optimizer.exclude_bias_and_norm", BOOL),
    ("optim.scheduler.warmup_epochs", NON_NEGATIVE),
    ("optim.scheduler.final_lr_ratio", PROBABILITY),
    # device
    ("device.type", choice("auto", "cpu", "cuda", "mps")),
    ("device.precision", choice("fp32", "bf16")),
    ("device.channels_last", BOOL),
    ("device.compile", BOOL),
    ("device.data_on_device", BOOL),
    # trackers (tracker=[mlflow,tensorboard])
    ("tracker.mlflow.tracking_uri", optional(TEXT)),
    ("tracker.mlflow.experiment", TEXT),
    ("tracker.mlflow.log_encoder", BOOL),
    ("tracker.mlflow.timeout_s", POSITIVE),
    ("tracker.tensorboard.projector", BOOL),
    # Hydra's instantiation keys, anywhere
    ("*_target_", TARGET),
    ("*_partial_", BOOL),
    ("*_recursive_", BOOL),
    ("*_convert_", choice("none", "partial", "object", "all")),
]

# The config groups and the nodes the code reads directly must be present; so must every
# trainer.* and eval.* key a shipped YAML sets (see _required).
REQUIRED = [
    "data",
    "encoder",
    "loss",
    "optim",
    "device",
    "trainer",
    "eval",
    "debug",
    "data.name",
    "data.channels",
    "data.image_size",
    "data.source",
    "data.augment",
    "optim.optimizer",
    "optim.scheduler",
]


def _required() -> list[str]:
    return REQUIRED + sorted(k for k in shipped_keys() if k.startswith(("trainer.", "eval.")))


def rule_for(key: str) -> Rule | None:
    return next((rule for pattern, rule in RULES if fnmatchcase(key, pattern)), None)


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
    loader = _locate(str(_get(cfg, "data.source._target_") or ""))
    shipped = CONF_DIR / "data" / f"{_get(cfg, 'data.name')}.yaml"
    if loader is None or not shipped.is_file():
        return None
    params = inspect.signature(loader).parameters
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
    """The callable ``loss._target_`` names (a method class), or None."""
    target = _get(cfg, "loss._target_")
    return _locate(target) if _is_dotted_path(target) else None


def _loss_choice(cfg: DictConfig) -> str:
    """``loss=<option>`` for a shipped method, else ``loss._target_=<path>``."""
    target = _get(cfg, "loss._target_")
    option = next((o for o, t in _loss_targets().items() if t == target), None)
    return f"loss={option}" if option else f"loss._target_={target}"


def _losses_where(attribute: str, value: bool) -> str:
    """The shipped loss options whose method class has ``attribute`` (default false) == value."""
    options = [
        o
        for o, t in _loss_targets().items()
        if bool(getattr(_locate(t), attribute, False)) == value
    ]
    return ", ".join(options)


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
    _batch_splits_over_devices,
    _shape_is_the_datasets,
    _queue_holds_a_step,
    _labels_as_positives,
    _local_crops_need_a_method_that_uses_them,
    _warmup_within_training,
    _nesterov_needs_momentum,
    _widths_match_strides,
]


# --------------------------------------------------------------------------- validate
def validate(cfg: DictConfig) -> None:
    """Raise ConfigError (one line: key, value, what is allowed) for the first bad setting.

    First of all, every ``_target_`` must be one contrast ships for its slot (nothing else is
    imported, not even to read its signature; see ``contrastive_cli.safety``)."""
    from contrastive_cli.safety import check_targets

    check_targets(cfg)
    for key in REQUIRED:
        if "." not in key and not _has(cfg, key):
            _missing(key)
    for key, value, raw in _leaves(cfg):
        rule = rule_for(key)
        if rule is None and key in shipped_keys():
            # A key a shipped YAML has but RULES lacks (a new setting): tests fail on it
            # (test_every_key_of_every_option_has_a_rule), runs go on unchecked.
            log.warning(f"warning: {key} has no validation rule; add one to RULES in {__name__}")
        elif rule is None:
            _check_unknown_key(cfg, key, value)
        elif not rule.check(value):
            source = f" (from {raw})" if raw else ""
            raise ConfigError(
                f"{key}={_show(value)}{source} is not allowed; allowed: {rule.allowed}"
            )
    for key in _required():
        if not _has(cfg, key):
            _missing(key)
    for combination in COMBINATIONS:
        problem = combination(cfg)
        if problem:
            raise ConfigError(problem)
    _check_objects(cfg)


def _missing(key: str) -> None:
    from contrastive_cli.config import config_groups

    rule, options = rule_for(key), config_groups().get(key)
    if options:
        allowed = f"{key}=<option>, one of {', '.join(options)}"
    else:
        allowed = rule.allowed if rule is not None and rule is not NODE else "the key, with a value"
    raise ConfigError(f"{key} is missing (deleted with ~{key}?); allowed: {allowed}")


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


@functools.cache
def shipped_keys() -> frozenset[str]:
    """Every dotted key that some shipped YAML file sets (``loss.queue_size``, ...)."""
    from contrastive_cli.config import CONF_DIR, config_groups

    def flat(node: object, prefix: str) -> Iterator[str]:
        if isinstance(node, DictConfig):
            for k in node:
                yield from flat(node._get_node(k), f"{prefix}{k}.")
        else:
            yield prefix[:-1]

    keys: set[str] = set()
    root = OmegaConf.load(CONF_DIR / "config.yaml")
    for k in root:
        if k not in ("defaults", "hydra"):
            keys.update(flat(root._get_node(k), f"{k}."))
    for group, options in config_groups().items():
        for option in options:
            keys.update(flat(OmegaConf.load(CONF_DIR / group / f"{option}.yaml"), f"{group}."))
    return frozenset(key for key in keys if not key.startswith("defaults"))


def _has(cfg: DictConfig, key: str) -> bool:
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent, throw_on_resolution_failure=False) if parent else cfg
    return isinstance(node, DictConfig) and leaf in node


def _leaves(node: DictConfig, prefix: str = "") -> Iterator[tuple[str, Any, str]]:
    """(dotted key, resolved plain value, the interpolation it came from or "")."""
    for key in node:
        full = f"{prefix}{key}"
        if full == "hydra":
            continue
        raw = ""
        child = node._get_node(key)
        if child is not None and child._is_interpolation():
            raw = str(child._value())
        try:
            value = node[key]
            if isinstance(value, ListConfig):
                value = OmegaConf.to_container(value, resolve=True)
        except MissingMandatoryValue:
            raise ConfigError(f"{full} has no value (???); allowed: set it, {full}=...") from None
        except OmegaConfBaseException as e:
            what = f"{full}={raw}" if raw else full
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ConfigError(
                f"{what} cannot be resolved ({reason}); allowed: a value, or ${{key}} of an existing key"
            ) from None
        if isinstance(value, DictConfig):
            yield from _leaves(value, f"{full}.")
        else:
            yield full, value, raw


def _check_unknown_key(cfg: DictConfig, key: str, value: Any) -> None:
    """A key no rule covers (added with +): fine only if its ``_target_`` takes it."""
    parent_key, _, name = key.rpartition(".")
    parent = _get(cfg, parent_key) if parent_key else cfg
    target = parent.get("_target_") if isinstance(parent, DictConfig) else None
    found = _locate(target) if _is_dotted_path(target) else None
    if found is not None:
        try:
            params = inspect.signature(found).parameters
        except (TypeError, ValueError):  # no signature to read: let the target decide
            return
        if name in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
            return
        names = ", ".join(p for p in params if p not in ("self", "args", "kwargs"))
        raise ConfigError(
            f"{key}={_show(value)} is not allowed: {target} takes no '{name}'; allowed keys: {names}"
        )
    raise ConfigError(
        f"{key}={_show(value)} is not allowed: contrast has no setting {key}"
        f"{_suggest(cfg, key)}; see `contrast train --cfg job` for the settings"
    )


def _suggest(cfg: DictConfig, key: str) -> str:
    keys = [k for k, _, _ in _leaves_quiet(cfg) if k != key]
    close = difflib.get_close_matches(key, keys, n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _leaves_quiet(cfg: DictConfig) -> list[tuple[str, Any, str]]:
    try:
        return list(_leaves(cfg))
    except ConfigError:
        return []


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

    for key, value, _ in _leaves(cfg):
        if key.endswith("_target_") and _locate(value) is None:
            raise ConfigError(
                f"{key}={_show(value)} is not allowed; allowed: an importable Python callable"
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
MAX_PRECHECKED_JOBS = 256


def check_command_line(args: Sequence[str]) -> None:
    """Compose the config ``contrast train <args>`` would run and validate it, before Hydra
    creates a run directory. Hydra's own errors (unknown key, unknown option, unparsable
    value) become one ConfigError line. Sweeps (-m): every job's overrides must compose;
    values are validated per job as it starts, so one bad job does not stop the others.
    Other Hydra flags (--help, --cfg, ...) and ``debug=true`` are left to Hydra as they are.
    """
    _check_config_name(args)
    if any(a.startswith("-") and a not in _HYDRA_FLAGS for a in args):
        return
    multirun = any(a in _HYDRA_FLAGS for a in args)
    overrides = [a for a in args if a not in _HYDRA_FLAGS]
    parsed = _parse(overrides)
    if any(
        o.key_or_group == "debug" and str(o.value()).lower() == "true"
        for o in parsed
        if not o.is_sweep_override()
    ):
        return
    if not multirun:
        sweeps = [o.input_line for o in parsed if o.is_sweep_override()]
        if sweeps:
            raise ConfigError(
                f"{sweeps[0]} is a sweep; add -m to run one job per value "
                "(or quote it, key='a,b', to pass it as a string)"
            )
        cfg = _compose(overrides)
        check_output_dir(cfg, "hydra.run.dir")
        validate(cfg)
        return
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
    problem = None
    if not existing.is_dir():
        problem = f"{existing} is not a folder"
    elif not os.access(existing, os.W_OK | os.X_OK):
        problem = f"{existing} is not writable"
    if problem:
        shown = raw if raw == literal else f"{literal}..."
        raise UserError(f"cannot create the run directory {shown} ({key}): {problem}")

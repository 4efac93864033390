"""What a setting may hold, written as Python types: the one source of validation.

A config value is checked against a type: the annotation of the constructor parameter it is
passed to (every ``_target_`` in the package annotates its parameters), or the field of a
section schema below for the sections that build no object (``trainer``, ``eval``, ...).
Ranges ride along as ``Annotated`` metadata (``annotated_types``), checked by pydantic in
strict mode (no "5" for 5, no true for 1, no inf)::

    temperature: Positive = 0.5                             # a number > 0
    mining: Literal["hard", "semihard", "all"] = "semihard"
    crop_scale: Annotated[Sequence[Fraction], Ordered] = (0.2, 1.0)
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from annotated_types import Ge, Gt, Interval, Len, MinLen
from pydantic import AfterValidator, ConfigDict, TypeAdapter, ValidationError


def _ordered(pair: Sequence[float]) -> Sequence[float]:
    if len(pair) != 2 or pair[0] > pair[1]:
        raise ValueError("a [low, high] pair with low <= high")
    return pair


MAX_BUDGET_S = 366 * 24 * 3600  # a year: any longer budget is a typo (1e308 overflowed)
_UNIT_S = {"s": 1, "m": 60, "h": 3600}


def _duration(value: str | float) -> str | float:
    """A time budget: '15m', '90s', '1.5h' or seconds, more than 0 and at most a year."""
    if isinstance(value, str):
        ok = re.fullmatch(r"\d+(\.\d+)?[smh]", value) is not None
        seconds = float(value[:-1]) * _UNIT_S[value[-1]] if ok else 0.0
    else:
        seconds = float(value)
    if not 0 < seconds <= MAX_BUDGET_S:  # also refuses nan and inf
        raise ValueError(
            "a duration such as 15m, 90s or 1.5h, or a number of seconds, up to a year"
        )
    return value


# The vocabulary the package's signatures use.
PositiveInt = Annotated[int, Ge(1)]
Count = Annotated[int, Ge(0)]
Positive = Annotated[float, Gt(0)]
NonNegative = Annotated[float, Ge(0)]
Probability = Annotated[float, Interval(ge=0, le=1)]
Fraction = Annotated[float, Interval(gt=0, lt=1)]
Momentum = Annotated[float, Interval(ge=0, lt=1)]
Text = Annotated[str, MinLen(1)]
Seed = Annotated[int, Interval(ge=0, le=2**63 - 1)]
Ordered = AfterValidator(_ordered)
NonEmpty = Len(min_length=1)
AreaRange = Annotated[Sequence[Annotated[float, Interval(gt=0, le=1)]], Ordered]  # of an image
PositiveRange = Annotated[Sequence[Positive], Ordered]
Kwargs = Annotated[dict[str, Any], "passed through"]  # keyword arguments for a library
Node = Annotated[dict, "config node"]  # keys under it: a section or an object
NODE_WORDS = "a config node (keys under it), as in the shipped configs"


BOUNDS = {  # pydantic's error types -> what is allowed, briefly
    "greater_than": "a number > {gt}",
    "greater_than_equal": "a number >= {ge}",
    "less_than": "a number < {lt}",
    "less_than_equal": "a number <= {le}",
    "too_short": "at least {min_length} item(s)",
    "too_long": "at most {max_length} item(s)",
}


@functools.cache
def _adapter(tp: Any) -> TypeAdapter | None:
    try:
        config = ConfigDict(allow_inf_nan=False, arbitrary_types_allowed=True)
        return TypeAdapter(tp, config=config)
    except Exception:  # a type pydantic cannot check (a callable's internals): not checked
        return None


def problem(value: Any, tp: Any) -> str | None:
    """None when the plain config ``value`` fits ``tp``, else what is allowed, in words."""
    adapter = _adapter(tp)
    if adapter is None:
        return None
    try:
        adapter.validate_python(value, strict=True)
        return None
    except ValidationError as e:
        if tp is Node:
            return NODE_WORDS
        error = e.errors()[0]
        template = BOUNDS.get(error["type"])
        words = (
            template.format(
                **{
                    k: f"{v:g}" if isinstance(v, float) else v
                    for k, v in error.get("ctx", {}).items()
                }
            )
            if template
            else error["msg"].removeprefix("Value error, ").removeprefix("Input should be ")
        )
        item = "".join(f"[{i}]" for i in error["loc"] if isinstance(i, int))
        return f"{words}" + (f" (item {item})" if item else "")


def is_plain(tp: Any) -> bool:
    """A type of plain config values (numbers, text, choices, lists, null), as opposed to a
    node (a section or an object, whose keys are checked one by one) or anything at all."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Annotated:
        return tp is not Node and is_plain(args[0])
    if origin in (typing.Union, __import__("types").UnionType):
        return all(is_plain(a) for a in args)
    if origin is Literal or tp in (bool, int, float, str, type(None)):
        return True
    if origin is dict:  # Kwargs: plain values passed through, by name, to a library
        return True
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        return all(is_plain(a) for a in args if a is not Ellipsis)
    return False


# --------------------------------------------------------------------------- where types come from
def parameters(target: Any) -> dict[str, Any] | None:
    """{parameter: type} of a callable's signature (Annotated kept; ``**kwargs`` as the key
    ``**``); None when it has no signature to read."""
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return None
    try:
        fn = target.__init__ if inspect.isclass(target) else target
        hints = typing.get_type_hints(fn, include_extras=True)
    except Exception:  # an annotation that does not resolve: the parameters still count
        hints = {}
    return {
        ("**" if p.kind is p.VAR_KEYWORD else name): hints.get(name, Any)
        for name, p in signature.parameters.items()
        if p.kind is not p.VAR_POSITIONAL
    }


# Constraints for callables the package does not own (torch's optimizers annotate types,
# not ranges): a schema next to what it configures.
FOREIGN: dict[str, dict[str, Any]] = {
    "torch.optim.AdamW": {
        "lr": Positive,
        "weight_decay": NonNegative,
        "betas": Annotated[Sequence[Momentum], Len(2, 2)],
        "eps": Positive,
        "amsgrad": bool,
    },
    "torch.optim.SGD": {
        "lr": Positive,
        "momentum": Momentum,
        "dampening": Probability,
        "weight_decay": NonNegative,
        "nesterov": bool,
    },
}


@functools.cache
def target_types(target: str) -> dict[str, Any] | None:
    """{parameter: type} for a dotted ``_target_`` (imported: callers check the allowlist
    first), with FOREIGN's constraints; None when it cannot be read."""
    from hydra.utils import get_object

    try:
        params = parameters(get_object(target))
    except Exception:
        return None
    return None if params is None else {**params, **FOREIGN.get(target, {})}


# --------------------------------------------------------------------------- plain sections
# Types only: the values, and their defaults, live in the YAML files.
@dataclass
class Root:
    data: Node
    encoder: Node
    loss: Node
    optim: Node
    device: Node
    trainer: Node
    eval: Node
    debug: bool
    tracker: Node | None  # none, or {mlflow: ..., tensorboard: ...}


@dataclass
class Trainer:
    epochs: PositiveInt
    batch_size: Annotated[int, Ge(2)]  # contrastive losses compare samples of a batch
    seed: Seed
    deterministic: bool
    checkpoint: bool
    checkpoint_every_s: NonNegative | None  # None (older configs): every epoch
    resume: bool
    log_every: PositiveInt
    log_every_s: Positive | None  # None (older configs): contrastive_cli.progress's default
    grad_clip: NonNegative
    time_budget: Annotated[str | float, AfterValidator(_duration)] | None
    devices: Annotated[int, Interval(ge=1, le=1024)]
    sync_bn: bool
    max_restarts: Annotated[int, Interval(ge=0, le=100)]


@dataclass
class Probe:
    weight_decays: Annotated[list[NonNegative], NonEmpty]
    val_fraction: Fraction
    max_iter: PositiveInt


@dataclass
class Finetune:
    enabled: bool
    epochs: PositiveInt
    lrs: Annotated[list[Positive], NonEmpty]
    val_fraction: Fraction
    batch_size: PositiveInt
    max_images: PositiveInt | None


@dataclass
class Eval:
    metrics: Annotated[list[Text], NonEmpty]  # evaluator names: contrastive_cli/evaluators/
    probe: Node
    knn_k: Annotated[list[PositiveInt], NonEmpty]
    knn_temperature: Positive
    baselines: bool
    cache_baselines: bool  # raw-pixel and random-init results from the cache when unchanged
    lowshot: list[Fraction]  # fractions of the train split per class ([]: no low-shot probes)
    lowshot_draws: PositiveInt
    retrieval_queries: PositiveInt | None  # None: every test image
    labelfree_size: Annotated[int, Ge(2)]
    finetune: Node
    every: Count
    monitor_bank: PositiveInt
    monitor_queries: PositiveInt
    batch_size: PositiveInt
    plots: bool
    embedding_points: Count


@dataclass
class Optim:
    optimizer: Node
    scheduler: Node
    lr: Positive  # the peak learning rate; optim.optimizer.lr interpolates it
    lr_scaling: Literal["none", "linear", "sqrt"]
    reference_batch: PositiveInt


@dataclass
class Data:
    """Keys of data options (most are copied into ``data.source`` and checked there too)."""

    name: Text
    channels: PositiveInt
    image_size: PositiveInt
    root: Text
    download: bool
    num_classes: Annotated[int, Ge(2)]
    mean: Annotated[list[float], NonEmpty]
    std: Annotated[list[Positive], NonEmpty]
    epochs: PositiveInt
    path: Text | None
    eval_path: Text | None
    test_fraction: Fraction
    cache: bool
    cache_dir: Text | None
    workers: Count | None
    extensions: Annotated[list[Text], NonEmpty]
    max_pixels: PositiveInt
    pretrain_split: Literal["unlabeled", "train", "train+unlabeled"]
    train_images: PositiveInt | None  # at most this many pretrained on / in train (fixed subset)
    test_images: PositiveInt | None  # at most this many in test (fixed stratified subset)
    source: Node
    augment: Node


@dataclass
class Starting:
    """Keys of the encoder section besides its ``_target_``'s (``contrastive_cli.starting``)."""

    weights: Text | None  # a state dict file or a run directory
    strict: bool
    pretrained: bool


SECTIONS = {
    "": Root,
    "trainer": Trainer,
    "eval": Eval,
    "eval.probe": Probe,
    "eval.finetune": Finetune,
    "optim": Optim,
}
SECTIONS["data"] = Data
SECTIONS["encoder"] = Starting  # not in REQUIRED_IN: configs saved before it lack the keys
REQUIRED_IN = ("", "trainer", "eval", "eval.probe", "optim")  # every (non-null) field is set


def section_types(section: str) -> dict[str, Any] | None:
    schema = SECTIONS.get(section)
    if schema is None:
        return None
    hints = typing.get_type_hints(schema, include_extras=True)
    return {f.name: hints[f.name] for f in dataclasses.fields(schema)}

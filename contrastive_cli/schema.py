"""What a setting may hold, written as Python types: the one source of validation.

A config value is checked against a type: the annotation of the constructor parameter it is
passed to (every ``_target_`` in the package annotates its parameters), or the field of a
section schema below for the sections that build no object (``trainer``, ``eval``, ...).
Ranges and shapes ride along as ``Annotated`` metadata::

    temperature: Positive = 0.5                           # a number > 0
    mining: Literal["hard", "semihard", "all"] = "semihard"
    crop_scale: Annotated[Sequence[float], Ordered(), Range(0, 1, low_open=True)]

``check(value, type)`` says whether a plain config value (int, float, bool, str, None, list)
fits, and ``describe(type)`` says in words what does, for the one-line error. Types that are
not config values (modules, tensors, callables) are not checked here: the object is built on
the meta device afterwards (``validate._check_objects``).
"""

from __future__ import annotations

import collections.abc
import dataclasses
import functools
import inspect
import math
import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal


# --------------------------------------------------------------------------- constraints
@dataclass(frozen=True)
class Range:
    """low <= value <= high (or < where open); applied to every item of a list."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def ok(self, v: Any) -> bool:
        values = v if isinstance(v, (list, tuple)) else [v]
        return all(
            (self.low is None or (x > self.low if self.low_open else x >= self.low))
            and (self.high is None or (x < self.high if self.high_open else x <= self.high))
            for x in values
        )

    def words(self) -> str:
        lo, hi = self.low, self.high
        if lo is not None and hi is not None:
            return (
                f"in {'(' if self.low_open else '['}{lo:g}, {hi:g}{')' if self.high_open else ']'}"
            )
        if lo is not None:
            return f"{'>' if self.low_open else '>='} {lo:g}"
        return f"{'<' if self.high_open else '<='} {hi:g}" if hi is not None else ""


@dataclass(frozen=True)
class Ordered:
    """A [low, high] pair with low <= high."""

    def ok(self, v: Any) -> bool:
        return isinstance(v, (list, tuple)) and len(v) == 2 and v[0] <= v[1]

    def words(self) -> str:
        return "[low, high] with low <= high"


@dataclass(frozen=True)
class Length:
    """A list of at least ``min`` items (or exactly ``exactly``)."""

    min: int = 1
    exactly: int | None = None

    def ok(self, v: Any) -> bool:
        n = len(v) if isinstance(v, (list, tuple)) else -1
        return n == self.exactly if self.exactly is not None else n >= self.min

    def words(self) -> str:
        return f"{self.exactly} values" if self.exactly is not None else "non-empty"


@dataclass(frozen=True)
class IsNode:
    """A config node with keys under it (a section or an object), not a plain value."""

    def ok(self, v: Any) -> bool:
        return isinstance(v, dict)

    def words(self) -> str:
        return "a config node (keys under it), as in the shipped configs"


@dataclass(frozen=True)
class NonEmpty:
    """A string that is not blank."""

    def ok(self, v: Any) -> bool:
        return isinstance(v, str) and v.strip() != ""

    def words(self) -> str:
        return "non-empty"


# The vocabulary the package's signatures use.
PositiveInt = Annotated[int, Range(1)]
Count = Annotated[int, Range(0)]
Positive = Annotated[float, Range(0, low_open=True)]
NonNegative = Annotated[float, Range(0)]
Probability = Annotated[float, Range(0, 1)]
Fraction = Annotated[float, Range(0, 1, low_open=True, high_open=True)]
Momentum = Annotated[float, Range(0, 1, high_open=True)]
Text = Annotated[str, NonEmpty()]
Seed = Annotated[int, Range(0, 2**63 - 1)]
Node = Annotated[dict, IsNode()]


# --------------------------------------------------------------------------- check, describe
def _parts(tp: Any) -> tuple[Any, list[Any]]:
    """(base type, constraints) of a possibly Annotated type."""
    if typing.get_origin(tp) is Annotated:
        base, *meta = typing.get_args(tp)
        inner, more = _parts(base)
        return inner, [*more, *meta]
    return tp, []


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType)


SEQUENCES = (list, tuple, collections.abc.Sequence, collections.abc.Iterable)


def check(value: Any, tp: Any) -> bool:
    """Whether the plain config ``value`` fits the type ``tp`` and its constraints."""
    base, constraints = _parts(tp)
    return _fits(value, base) and all(c.ok(value) for c in constraints if hasattr(c, "ok"))


def _fits(value: Any, tp: Any) -> bool:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any or tp is inspect.Parameter.empty:
        return True
    if _is_union(tp):
        return any(check(value, a) for a in args)
    if tp is type(None) or tp is None:
        return value is None
    if origin is Literal:
        return any(value == a and type(value) is type(a) for a in args)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return (
            isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        )
    if tp is str:
        return isinstance(value, str)
    if origin in SEQUENCES or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(
                check(v, a) for v, a in zip(value, args, strict=True)
            )
        item = args[0] if args else Any
        return all(check(v, item) for v in value)
    if origin is dict or tp is dict:
        return isinstance(value, dict)
    return True  # modules, tensors, callables: checked when built on the meta device


def describe(tp: Any) -> str:
    """What fits ``tp``, in words: 'an integer >= 1', 'one of a, b', 'a list of numbers'."""
    base, constraints = _parts(tp)
    words = [c.words() for c in constraints if hasattr(c, "words") and c.words()]
    ordered = [w for w in words if w.startswith("[low")]
    if any(isinstance(c, IsNode) for c in constraints):
        return IsNode().words()
    if ordered:  # a pair: say it as one phrase
        rest = [w for w in words if not w.startswith("[low")]
        return f"{ordered[0]}" + (f", both {' '.join(rest)}" if rest else "")
    noun = _noun(base)
    return f"{noun} {' '.join(words)}".strip() if words else noun


def _noun(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if _is_union(tp):
        others = [a for a in args if a is not type(None)]
        inner = " or ".join(describe(a) for a in others)
        return f"null or {inner}" if len(others) < len(args) else inner
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if tp is bool:
        return "true or false"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if origin in SEQUENCES or tp in (list, tuple):
        if origin is tuple and args and args[-1] is not Ellipsis:
            return f"a list of {len(args)} " + _plural(describe(args[0]))
        return "a list of " + _plural(describe(args[0]) if args else "values")
    return "a value"


def _plural(words: str) -> str:
    for singular, plural in (
        ("an integer", "integers"),
        ("a number", "numbers"),
        ("a string", "strings"),
    ):
        if words.startswith(singular):
            return plural + words[len(singular) :]
    return words


# --------------------------------------------------------------------------- where types come from
def parameters(target: Any) -> dict[str, Any] | None:
    """{parameter: type} of a callable's signature (Annotated kept), plus ``**kwargs`` as
    the key ``**``; None when it has no signature to read."""
    fn = target.__init__ if inspect.isclass(target) else target
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return None
    try:
        hints = typing.get_type_hints(fn, include_extras=True)
    except Exception:  # an annotation that does not resolve: the parameters still count
        hints = {}
    params = {}
    for name, p in signature.parameters.items():
        if p.kind is p.VAR_KEYWORD:
            params["**"] = Any
        elif p.kind is not p.VAR_POSITIONAL:
            params[name] = hints.get(name, Any)
    return params


# Constraints for callables the package does not own (torch's optimizers annotate types,
# not ranges): a schema next to what it configures.
FOREIGN: dict[str, dict[str, Any]] = {
    "torch.optim.AdamW": {
        "lr": Positive,
        "weight_decay": NonNegative,
        "betas": Annotated[tuple[float, float], Range(0, 1, high_open=True)],
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
    if params is not None:
        params.update(FOREIGN.get(target, {}))
    return params


# --------------------------------------------------------------------------- plain sections
@dataclass
class Trainer:
    epochs: PositiveInt
    batch_size: Annotated[int, Range(2)]  # contrastive losses compare samples of a batch
    seed: Seed
    deterministic: bool
    checkpoint: bool
    resume: bool
    log_every: PositiveInt
    grad_clip: NonNegative
    devices: Annotated[int, Range(1, 1024)]
    sync_bn: bool
    max_restarts: Annotated[int, Range(0, 100)]


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
class Probe:
    weight_decays: Annotated[list[NonNegative], Length()]
    val_fraction: Fraction
    max_iter: PositiveInt


@dataclass
class Eval:
    probe: Node
    knn_k: Annotated[list[PositiveInt], Length()]
    knn_temperature: Positive
    baselines: bool
    cache_baselines: bool  # raw-pixel and random-init results from the cache when unchanged
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
    """The plain keys of data options (most are copied into ``data.source`` by interpolation
    and checked there too; every option has name, channels and image_size)."""

    name: Text
    channels: PositiveInt
    image_size: PositiveInt
    root: Text
    download: bool
    num_classes: Annotated[int, Range(2)]
    mean: Annotated[list[float], Length()]
    std: Annotated[list[Positive], Length()]
    epochs: PositiveInt
    path: Text | None
    eval_path: Text | None
    test_fraction: Fraction
    cache: bool
    cache_dir: Text | None
    workers: Count | None
    extensions: Annotated[list[Text], Length()]
    max_pixels: PositiveInt
    pretrain_split: Literal["unlabeled", "train", "train+unlabeled"]
    source: Node
    augment: Node


SECTIONS: dict[str, type] = {
    "": Root,
    "trainer": Trainer,
    "eval": Eval,
    "eval.probe": Probe,
    "optim": Optim,
    "data": Data,
}
REQUIRED_IN = ("trainer", "eval", "eval.probe", "optim")  # every field must be set


def section_types(section: str) -> dict[str, Any] | None:
    schema = SECTIONS.get(section)
    if schema is None:
        return None
    hints = typing.get_type_hints(schema, include_extras=True)
    return {f.name: hints[f.name] for f in dataclasses.fields(schema)}

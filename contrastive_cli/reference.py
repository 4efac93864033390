"""``contrast train --help``: every setting with its type, allowed values, default and a
one-line description, generated from the schemas and the configs, without importing torch.

Where each column comes from:

- the settings and their defaults: the config ``contrast train <overrides>`` composes (an
  interpolated default shows the key it follows, ``= data.epochs``);
- type and allowed values: ``schema.py``'s section dataclasses (``trainer``, ``eval``, ...)
  and, for objects (``loss``, ``encoder``, ``optim.optimizer``...), the annotations of the
  constructor a ``_target_`` names, read from its source file with ``ast`` (not imported);
- the description: the comment on the key's line in the YAML file that sets it, else the
  ``Args:`` entry of the constructor's docstring, else the comment on its parameter line.

Internal plumbing is hidden: ``_target_``/``_partial_``, keys that copy another key
(``${..root}``), options starting with ``_`` (``device/_base``).
"""

from __future__ import annotations

import ast
import contextlib
import difflib
import functools
import re
import typing
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from omegaconf import DictConfig, ListConfig, OmegaConf

from contrastive_cli import schema
from contrastive_cli.config import CONF_DIR, OVERLAYS, config_groups
from contrastive_cli.errors import ConfigError

PACKAGE_DIR = Path(__file__).resolve().parent
# Sections in the order a newcomer needs them.
SECTIONS = ("trainer", "data", "encoder", "loss", "optim", "eval", "device", "tracker", "debug")


# Descriptions of settings whose YAML line and constructor docstring say nothing (the
# first two sources win; tests/test_reference.py keeps every shipped setting described).
ABOUT = {
    "data.name": "the dataset's name (in run directory names and results)",
    "data.root": "folder holding the datasets (downloads go there)",
    "data.download": "fetch missing files with torchvision (needs internet)",
    "data.channels": "image channels (1: grayscale, 3: colour)",
    "data.image_size": "image side in pixels",
    "data.num_classes": "classes of the labels (k-NN and probe)",
    "data.mean": "per-channel mean used to normalise pixels",
    "data.std": "per-channel standard deviation used to normalise pixels",
    "data.epochs": "this dataset's default trainer.epochs",
    "data.extensions": "file types read from the folder",
    "data.source.folder": "the dataset's folder under data.root",
    "data.source.url": "where the files come from (named in a missing-file error)",
    "data.source.extra_dirs": "other folders searched for the files (Debian's packages)",
    "data.source.train_files": "training batch files",
    "data.source.test_files": "test batch files",
    "data.source.label_key": "which labels of the batch files to use",
    "data.source.test_fraction": "share of the images held out as the test split",
    "data.augment.brightness": "brightness jitter strength",
    "data.augment.contrast": "contrast jitter strength",
    "data.augment.saturation": "saturation jitter strength",
    "data.augment.hue": "hue jitter strength",
    "data.augment.blur_p": "probability of a Gaussian blur",
    "data.augment.blur_sigma": "range of the blur's sigma in pixels",
    "device.type": "where to train: auto picks cuda, else mps, else cpu",
    "encoder.widths": "channels of each conv block",
    "encoder.strides": "stride of each conv block (one per width)",
    "encoder.hidden_dims": "widths of the hidden layers",
    "encoder.stem": "first layer: small images keep their resolution",
    "loss.temperature": "softmax temperature T of the similarities",
    "loss.queue_size": "negatives kept from earlier batches",
    "loss.momentum": "EMA momentum of the key encoder",
    "loss.key_bn_splits": "groups the keys' BatchNorm is computed in (shuffle-BN on one device)",
    "loss.symmetric": "also swap query and key views (two losses per step)",
    "loss.base_momentum": "EMA momentum of the target at the start (rises to 1)",
    "loss.center_momentum": "EMA momentum of the teacher's output centre",
    "loss.student_temp": "softmax temperature of the student",
    "loss.teacher_temp_start": "teacher temperature at the start of the warmup",
    "loss.teacher_temp_end": "teacher temperature after the warmup",
    "loss.margin": "how far negatives must be beyond positives",
    "loss.mining": "which negatives of the batch count",
    "loss.positives": "positive pairs: two views of one image, or one class",
    "loss.distance": "distance between embeddings",
    "loss.scale": "multiplies the whole loss",
    "loss.lambda_offdiag": "weight of the redundancy (off-diagonal) term",
    "loss.sim_coeff": "weight of the invariance term",
    "loss.std_coeff": "weight of the variance term",
    "loss.cov_coeff": "weight of the covariance term",
    "loss.projector.hidden_dim": "projector hidden width",
    "loss.projector.out_dim": "projection (embedding) dimension the loss sees",
    "loss.predictor.hidden_dim": "predictor hidden width",
    "loss.expander.hidden_dim": "expander hidden width",
    "loss.expander.out_dim": "expander output dimension",
    "loss.head.hidden_dim": "head hidden width",
    "loss.head.bottleneck_dim": "head bottleneck before the prototypes",
    "loss.epochs": "the run's epochs (follows trainer.epochs; not a setting of its own)",
    "loss.epsilon": "entropy regularisation of the Sinkhorn-Knopp codes",
    "loss.sinkhorn_iterations": "Sinkhorn-Knopp iterations per step",
    "loss.prototypes": "learnt prototype vectors (clusters)",
    "loss.queue_start_epoch": "epoch from which the queue of past embeddings is used",
    "loss.freeze_prototypes_epochs": "epochs the prototypes stay fixed at the start",
    "optim.optimizer.lr": "the optimizer's learning rate (follows optim.lr)",
    "optim.optimizer.weight_decay": "L2 penalty",
    "optim.optimizer.momentum": "SGD momentum",
    "optim.optimizer.nesterov": "Nesterov momentum",
    "optim.scheduler.warmup_epochs": "epochs of linear warmup from 0 to optim.lr",
    "optim.scheduler.final_lr_ratio": "learning rate at the end, as a share of optim.lr",
}


@dataclass
class Setting:
    key: str
    kind: str  # type and allowed values, in words
    default: str
    about: str


# --------------------------------------------------------------------------- types in words
def _number(v: Any) -> str:
    if isinstance(v, int) and v == 2**63 - 1:
        return "2^63-1"
    return f"{v:g}" if isinstance(v, float) else str(v)


def _constraint(meta: Any) -> str | None:
    from annotated_types import Ge, Gt, Interval, Le, Len, Lt, MinLen

    if isinstance(meta, Interval):
        lo = "[" if meta.ge is not None else "("
        hi = "]" if meta.le is not None else ")"
        low = meta.ge if meta.ge is not None else meta.gt
        high = meta.le if meta.le is not None else meta.lt
        return f"in {lo}{_number(low)}, {_number(high)}{hi}"
    for cls, sign, attr in ((Ge, ">=", "ge"), (Gt, ">", "gt"), (Le, "<=", "le"), (Lt, "<", "lt")):
        if isinstance(meta, cls):
            return f"{sign} {_number(getattr(meta, attr))}"
    if isinstance(meta, (MinLen, Len)):
        if getattr(meta, "max_length", None) == meta.min_length:
            return f"({meta.min_length} items)"
        return "(non-empty)" if meta.min_length == 1 else f"({meta.min_length}+ items)"
    if meta is schema.Ordered:
        return "[low, high]"
    func = getattr(meta, "func", None)
    if func is schema._duration:
        return "like 15m, 90s, 1.5h"
    return None


def describe(tp: Any) -> str:
    """A type annotation in words: ``Annotated[int, Ge(1)]`` -> ``int >= 1``."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Annotated:
        base = describe(args[0])
        words = [w for w in map(_constraint, args[1:]) if w]
        if "[low, high]" in words and base.startswith("list of "):
            words.remove("[low, high]")
            base = "[low, high] of " + base.removeprefix("list of ")
        if base == "text" and "(non-empty)" in words:
            words.remove("(non-empty)")
        if "like 15m, 90s, 1.5h" in words:  # text like 15m, or a number of seconds
            return "duration: 15m|90s|1.5h or seconds (> 0, <= 1 year)"
        return " ".join([base, *words]).strip()
    if origin is Literal:
        return "one of " + "|".join(str(a) for a in args)
    if origin in (typing.Union, __import__("types").UnionType):
        return " or ".join(describe(a) for a in args)
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        inner = [a for a in args if a is not Ellipsis]
        return f"list of {describe(inner[0])}" if inner else "list"
    names = {bool: "bool", int: "int", float: "number", str: "text", type(None): "null"}
    if tp in names:
        return names[tp]
    if tp is Any or tp is dict:
        return ""
    return getattr(tp, "__name__", str(tp))


# --------------------------------------------------------------------------- objects' parameters
def _module_file(module: str) -> Path | None:
    """The source file of a ``contrastive_cli`` module, without importing it."""
    if not module.startswith("contrastive_cli."):
        return None
    base = PACKAGE_DIR.joinpath(*module.split(".")[1:])
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


@functools.cache
def _aliases(module: str, depth: int = 0) -> dict[str, Any]:
    """The type aliases a module defines (``Mining = Literal[...]``) or imports by name from
    another module of the package, evaluated with the schema's vocabulary."""
    path = _module_file(module)
    if path is None or depth > 2:
        return {}
    namespace = dict(_NAMESPACE)
    for stmt in ast.parse(path.read_text()).body:
        if isinstance(stmt, ast.ImportFrom) and stmt.module and depth < 2:
            found = _aliases(stmt.module, depth + 1)
            for alias in stmt.names:
                if alias.name in found:
                    namespace[alias.asname or alias.name] = found[alias.name]
        elif isinstance(stmt, ast.Assign) and len(stmt.targets) == 1:
            target = stmt.targets[0]
            if isinstance(target, ast.Name):
                with contextlib.suppress(Exception):
                    namespace[target.id] = _eval(stmt.value, namespace)
    return namespace


@functools.cache
def _source_of(target: str) -> tuple[ast.AST, str] | None:
    """The ``ast`` node (class or function) a dotted ``_target_`` of the package names, and
    its source text; None for anything outside the package or not found."""
    module, _, name = target.rpartition(".")
    path = _module_file(module)
    if path is None:
        return None
    text = path.read_text()
    for node in ast.parse(text).body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)) and node.name == name:
            return node, text
    return None


_NAMESPACE = {
    **{k: getattr(schema, k) for k in dir(schema) if not k.startswith("__")},
    **{k: getattr(typing, k) for k in ("Annotated", "Literal", "Any", "Optional", "Union")},
    "Sequence": Sequence,
    **{t.__name__: t for t in (bool, int, float, str, list, tuple, dict)},
}


@functools.cache
def target_settings(target: str) -> dict[str, tuple[str, str]]:
    """{parameter: (type in words, description)} of a ``_target_``, from its source."""
    if target in schema.FOREIGN:
        return {k: (describe(t), "") for k, t in schema.FOREIGN[target].items()}
    found = _source_of(target)
    if found is None:
        return {}
    node, text = found
    namespace = _aliases(target.rpartition(".")[0])
    doc = ast.get_docstring(node) or ""
    if isinstance(node, ast.ClassDef):
        init = next(
            (n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"),
            None,
        )
        if init is None:
            return {}
        doc += "\n" + (ast.get_docstring(init) or "")
        node = init
    assert isinstance(node, ast.FunctionDef)
    lines = text.splitlines()
    out = {}
    for arg in [*node.args.args, *node.args.kwonlyargs]:
        kind = ""
        if arg.annotation is not None:
            try:
                kind = describe(_eval(arg.annotation, namespace))
            except Exception:  # a type of another module (nn.Module, Gather): not a setting
                kind = ""
        about = _docstring_arg(doc, arg.arg) or _line_comment(lines[arg.lineno - 1])
        out[arg.arg] = (kind, about)
    return out


def _eval(expr: ast.expr, namespace: dict[str, Any]) -> Any:
    """A type expression of the package's own source, evaluated with the schema's vocabulary
    only (no builtins: nothing but names of types can be reached)."""
    return eval(ast.unparse(expr), {"__builtins__": {}}, namespace)


def _docstring_arg(doc: str, name: str) -> str:
    """The first sentence (or line) that ``Args:`` or a ````name````: paragraph gives it."""
    name = re.escape(name)
    match = re.search(rf"^\s*(?:{name}|``{name}``)(?: \([^)]*\))?:\s*(.+)$", doc, re.M)
    return match.group(1).strip().split("; ")[0] if match else ""


def _line_comment(line: str) -> str:
    return line.split("#", 1)[1].strip() if "#" in line else ""


# --------------------------------------------------------------------------- YAML comments
@functools.cache
def yaml_comments(path: Path) -> dict[str, str]:
    """{dotted key: the comment on its line} of one YAML file (nesting by indentation)."""
    comments: dict[str, str] = {}
    stack: list[tuple[int, str]] = []
    for line in path.read_text().splitlines():
        match = re.match(r"^(\s*)([\w.]+):(.*)$", line)
        if not match or line.lstrip().startswith("#"):
            continue
        indent, key, rest = len(match.group(1)), match.group(2), match.group(3)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        full = ".".join([*(k for _, k in stack), key])
        stack.append((indent, key))
        if "#" in rest and not re.search(r"['\"][^'\"]*#", rest):
            comments[full] = rest.split("#", 1)[1].strip()
    return comments


@functools.cache
def _option_files(group: str, option: str) -> tuple[Path, ...]:
    """The option's YAML file and those its defaults list pulls from the same group (each
    file read once: ``--help`` asks this for every setting)."""
    import yaml

    path = CONF_DIR / group / f"{option}.yaml"
    if not path.is_file():
        return ()
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    node = yaml.load(path.read_text(), Loader=loader)  # a safe loader
    files = (path,)
    for entry in (node.get("defaults") if isinstance(node, dict) else None) or []:
        if isinstance(entry, str) and entry != "_self_":
            files += _option_files(group, entry)
    return files


def _comment(key: str, choices: dict[str, str]) -> str:
    """The YAML comment for ``key``: in the chosen option of the deepest group holding it,
    else in config.yaml."""
    for group in sorted(choices, key=lambda g: -g.count("/")):
        prefix = group.replace("/", ".") + "."
        if key.startswith(prefix) and choices[group]:
            for path in _option_files(group, choices[group]):
                if text := yaml_comments(path).get(key[len(prefix) :]):
                    return text
    return yaml_comments(CONF_DIR / "config.yaml").get(key, "")


# --------------------------------------------------------------------------- the settings
def settings(cfg: DictConfig, choices: dict[str, str]) -> list[Setting]:
    """Every user-facing setting of a composed config (no ``hydra`` node), in SECTIONS order."""
    out: list[Setting] = []

    def walk(node: DictConfig, prefix: str, target: str | None, types: dict[str, Any]) -> None:
        params = target_settings(target) if target else {}
        for name in node.keys():  # noqa: SIM118 - no resolving
            key = f"{prefix}{name}"
            child = node._get_node(name)
            raw = child._value() if child is not None else None
            if str(name).startswith("_"):
                continue
            if isinstance(raw, str) and raw.startswith("${.") and raw.endswith("}"):
                continue  # a copy of a neighbour's value (data.source.root: ${..root})
            if isinstance(child, DictConfig) and (len(child) or str(name) not in params):
                walk(child, f"{key}.", _target(child), schema.section_types(key) or {})
                continue  # an empty mapping a target takes (encoder.kwargs) is a setting
            kind, about = params.get(str(name), ("", ""))
            if not kind and str(name) in types:
                kind = describe(types[str(name)])
            about = _comment(key, choices) or about or ABOUT.get(key, "")
            out.append(Setting(key, kind, _default(cfg, key, raw), about))

    for section in SECTIONS:
        if section not in cfg:
            continue
        child = cfg._get_node(section)
        if isinstance(child, DictConfig):
            walk(child, f"{section}.", _target(child), schema.section_types(section) or {})
        else:
            root = schema.section_types("") or {}
            kind = describe(root[section]) if section in root and section != "tracker" else ""
            about = _comment(section, choices)
            out.append(Setting(section, kind, _default(cfg, section, child._value()), about))
    return out


def _target(node: DictConfig) -> str | None:
    """The ``_target_`` a node builds, unresolved; None for a plain section."""
    if "_target_" not in node.keys():  # noqa: SIM118 - no resolving
        return None
    return str(node._get_node("_target_")._value())


def _default(cfg: DictConfig, key: str, raw: Any) -> str:
    from contrastive_cli.validate import _show

    if isinstance(raw, str) and (env := re.fullmatch(r"\$\{oc\.env:(\w+),([^}]*)\}", raw)):
        return f"{env.group(2)} (or ${env.group(1)})"
    if isinstance(raw, str) and raw.startswith("${") and raw.endswith("}"):
        inner = raw[2:-1]
        if re.fullmatch(r"[\w.]+", inner):
            try:
                value = OmegaConf.select(cfg, key)
                shown = value if isinstance(value, str) else _show(_plain(value))
            except Exception:
                shown = "?"
            return f"{shown} (= {inner})"
        return "(computed)"
    return raw if isinstance(raw, str) else _show(_plain(raw))  # as typed: loss.mining=hard


def _plain(value: Any) -> Any:
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


# --------------------------------------------------------------------------- the text
def _table(rows: list[Setting]) -> list[str]:
    if not rows:
        return []
    w_key = max(len(r.key) for r in rows)
    w_kind = min(max(len(r.kind) for r in rows), 46)
    w_default = min(max(len(r.default) for r in rows), 24)
    lines = []
    for r in rows:
        default = r.default if len(r.default) <= 40 else r.default[:37] + "..."
        line = f"  {r.key:<{w_key}}  {r.kind:<{w_kind}}  {default:<{w_default}}  {r.about}"
        lines.append(line.rstrip())
    return lines


def reference(overrides: Sequence[str] = (), only: str | None = None) -> str:
    """The text of ``contrast train [overrides] --help [only]``: ``only`` is a section
    (``trainer``, ``loss``), a config group, or a key prefix (``loss.temperature``)."""
    from contrastive_cli.command_line import _compose
    from contrastive_cli.validate import _suggest

    full = _compose(list(overrides))
    choices = {str(k): str(v) for k, v in full.hydra.runtime.choices.items() if v is not None}
    cfg = full.copy()
    from omegaconf import open_dict

    with open_dict(cfg):
        cfg.pop("hydra", None)
    rows = settings(cfg, choices)
    groups = {**config_groups(), **config_groups(overlays=True)}
    lines: list[str] = []
    if only is None:
        lines += [
            "contrast train [group=option ...] [key=value ...]   (contrast train --help SECTION: one section)",
            "",
            "Settings are given as key=value (trainer.epochs=20); a group option selects a whole",
            "section (loss=moco). Columns: setting, type and allowed values, default, description.",
        ]
    wanted = (only or "").strip().lstrip("+")
    if (
        wanted
        and wanted.replace("/", ".")
        not in {r.key for r in rows} | set(groups) | {k.replace("/", ".") for k in groups}
        and not any(r.key.startswith(wanted + ".") for r in rows)
    ):
        near = difflib.get_close_matches(wanted, [s for s in SECTIONS if s in cfg], n=1)
        hint = (
            f" (did you mean {near[0]}?)" if near and "." not in wanted else _suggest(cfg, wanted)
        )
        raise ConfigError(
            f"--help {only}: contrast has no setting or section {only}{hint}; "
            f"allowed: one of {', '.join(s for s in SECTIONS if s in cfg)}, or a key such as "
            "trainer.epochs"
        )
    for section in SECTIONS:
        if section not in cfg:
            continue
        in_section = sorted(  # a section's own keys, then its objects' (data.augment.*)
            (r for r in rows if r.key == section or r.key.startswith(section + ".")),
            key=lambda r: r.key.count("."),
        )
        if wanted:
            prefix = wanted.replace("/", ".")
            if not (prefix == section or prefix.startswith(section + ".")):
                continue
            in_section = [
                r for r in in_section if r.key == prefix or r.key.startswith(prefix + ".")
            ]
        header = section
        nested = [g for g in groups if g.split("/")[0] == section]
        picks = [f"{g}={choices.get(g, 'null')} (options: {', '.join(groups[g])})" for g in nested]
        if picks:
            header += ": " + "; ".join(picks)
        lines += ["", header, *_table(in_section)]
    if only is None or wanted in OVERLAYS:
        for overlay in OVERLAYS:
            options = groups.get(overlay, [])
            lines += [
                "",
                f"+{overlay}=<option>: a whole recipe on top of the defaults; options: "
                f"{', '.join(options)}",
            ]
    if only is None:
        lines += [
            "",
            "Also: -m (one run per value of a sweep: loss=ntxent,moco), contrast train --hydra-help",
            "(Hydra's own flags), contrast --help (the other commands).",
        ]
    return "\n".join(lines)

"""Starting weights: ``encoder.weights=PATH`` loads a state dict into the encoder before
training, ``encoder.pretrained=true`` takes timm's own pretrained weights.

PATH is a ``.safetensors`` file, a ``.pt``/``.pth``/``.bin`` file (read with
``torch.load(weights_only=True)``: tensors and plain data only, nothing in it is run),
another run's ``encoder.safetensors`` or its run directory. Names are mapped onto the
encoder's: a wrapper prefix (``module.``, ``encoder.``, ``backbone.``, a ``state_dict`` or
``model`` entry) is taken off and the encoder's own (``net.`` of ``ResNet18``, ``model.`` of
``TimmEncoder``) put on, whichever matches most keys; a classifier (``fc.``, ``head.``,
``classifier.``) the encoder does not have is dropped. What still does not match is one
ConfigError line (exit 2), unless ``encoder.strict=false``: then what matches is loaded
and the rest logged. The file's SHA-256 is recorded in the run (results.json, checkpoints);
``contrast resume`` and ``contrast reproduce`` compare it with the file's.
"""

from __future__ import annotations

import hashlib
import io
import logging
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

from contrastive_cli.errors import ConfigError
from contrastive_cli.untrusted import printable

log = logging.getLogger(__name__)

SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
CLASSIFIERS = ("fc.", "head.", "classifier.")  # dropped when the encoder has no such key
WRAPPERS = ("", "module.", "encoder.", "backbone.", "model.", "net.")  # taken off the file's
NESTED = ("state_dict", "model", "module", "encoder")  # a training checkpoint's entry
SHOWN = 3  # names shown per kind of mismatch


@dataclass(frozen=True)
class Starting:
    """The starting weights of a run: the tensors (mapped onto the encoder's names), where
    they came from and the SHA-256 of the file (None for timm's own download)."""

    source: str
    sha256: str | None
    state: dict[str, torch.Tensor]
    strict: bool

    def record(self) -> dict[str, Any]:
        """What results.json and the checkpoints hold (``starting_weights``)."""
        return {"source": self.source, "sha256": self.sha256, "strict": self.strict}

    def load_into(self, encoder: nn.Module) -> nn.Module:
        """``encoder`` with these weights (what does not match: one line, or skipped)."""
        fit = fit_state(self.state, encoder, self.source, self.strict)
        encoder.load_state_dict(fit, strict=False)
        return encoder


def weights_file(value: str) -> Path:
    """The file ``encoder.weights=value`` names: the file itself, or a run directory's
    ``encoder.safetensors``; one ConfigError line when it is neither."""
    path = Path(value).expanduser()
    allowed = "allowed: a .safetensors, .pt, .pth or .bin file, or a run directory"
    if path.is_dir():
        inner = path / "encoder.safetensors"
        if not inner.is_file():
            raise ConfigError(
                f"encoder.weights={printable(value)} is a folder without encoder.safetensors "
                f"(not a finished run); {allowed}"
            )
        return inner.resolve()
    if not path.exists():
        raise ConfigError(f"encoder.weights={printable(value)}: no such file; {allowed}")
    if path.suffix.lower() not in SUFFIXES or not path.is_file():
        raise ConfigError(f"encoder.weights={printable(value)} is not allowed; {allowed}")
    return path.resolve()  # the user's own path: a link to it is theirs to follow


def sha256_of(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def read_state(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file, read as data (one ConfigError line when it cannot be)."""
    from contrastive_cli.errors import CheckpointError
    from contrastive_cli.untrusted import UntrustedFile, read_bytes
    from contrastive_cli.weights import read_weights

    if path.suffix.lower() == ".safetensors":
        try:
            return read_weights(path)
        except CheckpointError as e:
            raise ConfigError(f"encoder.weights: {e}") from None
    try:
        data = read_bytes(path, "weights", follow=True)
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except UntrustedFile as e:
        raise ConfigError(f"encoder.weights: {e}") from None
    except pickle.UnpicklingError as e:
        from contrastive_cli.checkpoint import _refusal_reason

        raise ConfigError(
            f"encoder.weights={path} was refused: it holds objects other than tensors and plain "
            f"data ({_refusal_reason(e)}); allowed: a state dict (torch.save(model.state_dict()))"
        ) from None
    except Exception as e:  # not a torch file, truncated
        reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ConfigError(f"encoder.weights={path} cannot be read ({reason})") from None
    return _tensors(state, path)


def _tensors(state: Any, path: Path) -> dict[str, torch.Tensor]:
    """The name -> tensor entries of a loaded file, looking inside a training checkpoint's
    ``state_dict``/``model`` entry when the top level holds no tensors."""
    for _ in range(3):
        if not isinstance(state, dict):
            break
        tensors = {str(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}
        if tensors:
            return tensors
        inner = next((state[k] for k in NESTED if isinstance(state.get(k), dict)), None)
        if inner is None:
            break
        state = inner
    raise ConfigError(
        f"encoder.weights={path} holds no tensors by name; allowed: a state dict "
        "(torch.save(model.state_dict()), a timm or torchvision checkpoint)"
    )


def mapped(state: dict[str, torch.Tensor], own: set[str]) -> dict[str, torch.Tensor]:
    """``state`` under the encoder's names: the wrapper prefix taken off and the encoder's
    own put on that match the most of ``own``; a classifier the encoder lacks dropped."""
    prefixes = {""} | {k.split(".", 1)[0] + "." for k in own if "." in k}
    best, score = ("", ""), -1
    for off in WRAPPERS:
        for on in sorted(prefixes):
            n = sum(1 for k in state if k.startswith(off) and on + k[len(off) :] in own)
            if n > score:
                best, score = (off, on), n
    off, on = best
    out = {}
    for k, v in state.items():
        bare = k[len(off) :] if k.startswith(off) else k
        name = on + bare if k.startswith(off) else k
        if name not in own and bare.startswith(CLASSIFIERS):
            continue  # the checkpoint's classifier: the encoder has none
        out[name] = v
    return out


def fit_state(
    state: dict[str, torch.Tensor],
    encoder: nn.Module,
    source: str,
    strict: bool,
    report: bool = True,
) -> dict[str, torch.Tensor]:
    """The entries of ``state`` (mapped) that fit ``encoder``. With ``strict``, any entry
    missing, unexpected or of another shape is one ConfigError line; else they are logged."""
    own = encoder.state_dict()
    state = mapped(state, set(own))
    missing = [
        k for k in own if k not in state and not k.endswith("num_batches_tracked")
    ]  # BatchNorm's counter: older checkpoints do not save it, nothing depends on it
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if not (missing or unexpected or wrong):
        return state
    parts = [
        f"{len(names)} {kind} ({', '.join(printable(n) for n in names[:SHOWN])}"
        + (", ..." if len(names) > SHOWN else "")
        + ")"
        for kind, names in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("of another shape", wrong),
        )
        if names
    ]
    if wrong:
        k = wrong[0]
        parts[-1] += f"; {k}: file {tuple(state[k].shape)}, encoder {tuple(own[k].shape)}"
    problem = "; ".join(parts)
    if strict:
        raise ConfigError(
            f"encoder.weights={source} does not fit the encoder: {problem}; allowed: weights of "
            "this encoder (with the same data.channels), or encoder.strict=false to load what "
            "matches"
        )
    fit = {k: v for k, v in state.items() if k in own and k not in wrong}
    if report:
        log.info(
            f"encoder.weights: loaded {len(fit)} of {len(own)} entries from {source}; skipped "
            f"(encoder.strict=false): {problem}"
        )
    return fit


def starting_weights(cfg: DictConfig, encoder: nn.Module) -> Starting | None:
    """The starting weights ``cfg.encoder`` names (None: the seed's initialisation), checked
    against ``encoder`` (the one ``cfg`` builds, on the meta device or a real one)."""
    node = cfg.encoder
    value, strict = node.get("weights"), bool(node.get("strict", True))
    if node.get("pretrained"):
        if value is not None:
            raise ConfigError(
                f"encoder.pretrained=true and encoder.weights={printable(value)} are both set; "
                "allowed: one of them"
            )
        from contrastive_cli.pretrained import timm_pretrained

        state, source = timm_pretrained(encoder, int(cfg.data.channels))
        starting = Starting(source, None, state, strict)
    elif value is None:
        return None
    else:
        path = weights_file(str(value))
        starting = Starting(str(path), sha256_of(path), read_state(path), strict)
    fit_state(starting.state, encoder, starting.source, strict, report=False)
    return starting


def check_recorded(cfg: DictConfig, recorded: Any, command: str) -> None:
    """One ConfigError line when the run started from a weights file (``recorded``: its
    ``starting_weights`` record) that is now missing or changed."""
    if not isinstance(recorded, dict) or not isinstance(recorded.get("sha256"), str):
        return
    value = cfg.encoder.get("weights")
    source = printable(recorded.get("source", value))
    if value is None:
        return
    try:
        path = weights_file(str(value))
    except ConfigError:
        raise ConfigError(
            f"{command}: the run's starting weights encoder.weights={printable(value)} are "
            f"missing; allowed: the file it started from (SHA-256 {recorded['sha256'][:16]}...) "
            "back in place"
        ) from None
    now = sha256_of(path)
    if now != recorded["sha256"]:
        raise ConfigError(
            f"{command}: the run's starting weights {source} changed since it started (SHA-256 "
            f"{now[:16]}..., the run recorded {recorded['sha256'][:16]}...); allowed: the same file"
        )

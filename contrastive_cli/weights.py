"""Reading encoder and method weights: one CheckpointError line for a file that is damaged
or that does not fit what the config builds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig

from contrastive_cli.errors import CheckpointError
from contrastive_cli.parts import build_encoder
from contrastive_cli.untrusted import printable


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; one CheckpointError line for a damaged file (bad
    header, sizes that do not match the data, not a safetensors file) or one that is not a
    regular file (a link, a FIFO)."""
    from safetensors.torch import load

    from contrastive_cli.untrusted import UntrustedFile, read_bytes, safetensors_header

    try:
        safetensors_header(path)
        return load(read_bytes(path, "weights", root=path.parent))
    except UntrustedFile as e:
        raise CheckpointError(str(e)) from None
    except Exception as e:  # SafetensorError and friends
        text = str(e).strip()
        reason = (text.splitlines()[0] if text else type(e).__name__)[:200]
        raise CheckpointError(f"{path} is not a readable safetensors file ({reason})") from None


def load_trained_encoder(cfg: DictConfig, path: Path) -> torch.nn.Module:
    """The encoder ``cfg`` builds, with the trained weights of ``path``. Its shapes are first
    compared, on the meta device (no memory), with the tensors the file's header declares,
    so an encoder config that does not fit the file (widths of a billion, from a forged
    config or metadata) is one line before anything is allocated."""
    from contrastive_cli.untrusted import UntrustedFile, safetensors_header

    try:
        shapes, _ = safetensors_header(path)
    except UntrustedFile as e:
        raise CheckpointError(str(e)) from None
    try:
        with torch.device("meta"):
            expected = {
                k: tuple(v.shape)
                for k, v in build_encoder(cfg, cfg.trainer.seed).state_dict().items()
            }
    except (RuntimeError, ValueError, TypeError, OverflowError, MemoryError) as e:
        raise CheckpointError(
            f"{path}: the encoder config cannot be built ({type(e).__name__})"
        ) from None
    if expected != shapes:
        missing = [k for k in expected if k not in shapes]
        wrong = [k for k in expected if k in shapes and expected[k] != shapes[k]]
        extra = [k for k in shapes if k not in expected]
        problem = (
            f"{missing[0]} is missing ({len(missing)} entries)"
            if missing
            else f"{wrong[0]} is {shapes[wrong[0]]}, the config builds {expected[wrong[0]]}"
            if wrong
            else f"{len(extra)} unexpected entries (e.g. {extra[0]})"
        )
        raise CheckpointError(f"{path} does not fit the run's config: {printable(problem)}")
    encoder = build_encoder(cfg, cfg.trainer.seed)
    load_weights(encoder, read_weights(path), path)
    return encoder


def load_weights(module: torch.nn.Module, state: dict[str, Any], source: Path) -> None:
    """``module.load_state_dict(state)``, with one CheckpointError line naming the first
    missing, unexpected or mis-shaped entry when ``state`` is not what the config builds."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    wrong = [
        f"{k} is {tuple(v.shape)}, the config builds {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and (not isinstance(v, torch.Tensor) or v.shape != own[k].shape)
    ]
    problem = (
        f"{len(missing)} entries missing (e.g. {missing[0]})"
        if missing
        else f"{len(unexpected)} unexpected entries (e.g. {unexpected[0]})"
        if unexpected
        else wrong[0]
        if wrong
        else None
    )
    if problem is None:
        try:
            module.load_state_dict(state)
            return
        except (RuntimeError, TypeError, ValueError) as e:
            problem = str(e).strip().splitlines()[0]
    raise CheckpointError(f"{source} does not fit the run's config: {problem}")

"""Reading encoder and method weights: one CheckpointError line for a file that is damaged
or that does not fit what the config builds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from contrastive_cli.errors import CheckpointError


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; one CheckpointError line for a damaged file (bad
    header, sizes that do not match the data, not a safetensors file)."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except OSError as e:
        raise CheckpointError(f"{path} cannot be read ({e.strerror or e})") from None
    except Exception as e:  # SafetensorError and friends
        text = str(e).strip()
        reason = (text.splitlines()[0] if text else type(e).__name__)[:200]
        raise CheckpointError(f"{path} is not a readable safetensors file ({reason})") from None


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

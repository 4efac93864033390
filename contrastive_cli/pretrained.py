"""``encoder.pretrained=true``: timm's own pretrained weights for a timm encoder, through
timm's own download (``timm.create_model(NAME, pretrained=True, ...)``, with the encoder's
``in_chans`` and arguments: timm adapts the first conv to the channels and resamples a
ViT's patch and position embeddings to its patch and image size). Offline, one line names
the file to download elsewhere and pass as ``encoder.weights``."""

from __future__ import annotations

import functools
import json
import logging

import torch
from torch import nn

from contrastive_cli.errors import ConfigError


def timm_pretrained(encoder: nn.Module, channels: int) -> tuple[dict[str, torch.Tensor], str]:
    """(the weights timm downloads for ``encoder``, a TimmEncoder, under its names; where
    they came from, ``timm:NAME.TAG``)."""
    name = getattr(encoder, "timm_name", None)
    if name is None:
        raise ConfigError(
            f"encoder.pretrained=true is not allowed for {type(encoder).__name__}: only timm "
            "encoders (encoder=timm and its recipes) have timm's pretrained weights; allowed: "
            "encoder.weights=PATH (a state dict file, e.g. torchvision's resnet18)"
        )
    kwargs = json.dumps(getattr(encoder, "timm_kwargs", {}), sort_keys=True)
    state, tag = _download(name, channels, kwargs)
    return state, f"timm:{tag}"


@functools.lru_cache(maxsize=2)  # validate, then the run: one download and one build
def _download(name: str, channels: int, kwargs: str) -> tuple[dict[str, torch.Tensor], str]:
    import timm

    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)  # its warning per failed request: the error says it once
    try:
        model = timm.create_model(
            name, pretrained=True, num_classes=0, in_chans=channels, **json.loads(kwargs)
        )
    except ConfigError:
        raise
    except Exception as e:  # offline, a hub or URL error, no pretrained weights for NAME
        raise ConfigError(
            f"encoder.pretrained=true: timm cannot fetch {name}'s weights ({type(e).__name__}: "
            f"{_first_line(e)}); allowed: download {where(name)} on a machine with network and "
            "pass it as encoder.weights=PATH (encoder.pretrained=false)"
        ) from None
    finally:
        hub_log.setLevel(level)
    tag = getattr(getattr(model, "pretrained_cfg", None), "get", lambda *_: None)("tag")
    state = {f"model.{k}": v.detach().clone() for k, v in model.state_dict().items()}
    return state, f"{name}.{tag}" if tag else name


def where(name: str) -> str:
    """The file timm would download for ``name``: its Hugging Face Hub file, else its URL."""
    import timm

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        return f"a state dict of {name}"
    if cfg.hf_hub_id:
        return f"https://huggingface.co/{cfg.hf_hub_id}/resolve/main/model.safetensors"
    return cfg.url or f"a state dict of {name}"


def _first_line(e: BaseException) -> str:
    """The first sentence of ``e``'s message, at most 160 characters."""
    text = str(e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    return line.split(". ")[0].rstrip(".")[:160]

"""The parts a run and the commands that read one (eval, embed, plot) build alone from a
config: the data, checked against the shape the config declares; the encoder, initialised
from the seed alone; what encoder.safetensors carries."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import torch
from hydra.errors import InstantiationException
from omegaconf import DictConfig, OmegaConf

from contrastive_cli.config import build
from contrastive_cli.data.datasets import ImageData, capped
from contrastive_cli.errors import DataError


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    else:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.benchmark = True


def load_data(cfg: DictConfig) -> ImageData:
    """The data source of ``cfg.data``, checked against the shape the config declares."""
    try:
        data: ImageData = build(cfg.data.source)
    except InstantiationException as e:  # unreadable files or folders: permissions, I/O errors
        if not isinstance(e.__cause__, OSError):
            raise
        err = e.__cause__
        raise DataError(
            f"data={cfg.data.name}: cannot read {err.filename or cfg.data.root} "
            f"({err.strerror or err})"
        ) from None
    _, c, h, w = data.pretrain.images.shape
    if c != cfg.data.channels or h != cfg.data.image_size or w != cfg.data.image_size:
        raise DataError(
            f"data={cfg.data.name}: images are {c}x{h}x{w} but the config says "
            f"data.channels={cfg.data.channels}, data.image_size={cfg.data.image_size}"
        )
    return capped(data, cfg.data.get("train_images"), cfg.data.get("test_images"))


# Keys of the encoder section that say where its weights start, not how it is built
# (``contrastive_cli.starting``): never passed to its ``_target_``.
STARTING_KEYS = ("weights", "strict", "pretrained")


def encoder_node(cfg: DictConfig) -> DictConfig:
    """The encoder section as its ``_target_`` takes it: without ``STARTING_KEYS``."""
    plain = OmegaConf.to_container(cfg.encoder, resolve=True)
    assert isinstance(plain, dict)
    return OmegaConf.create({k: v for k, v in plain.items() if k not in STARTING_KEYS})


def build_encoder(cfg: DictConfig, seed: int) -> torch.nn.Module:
    """The encoder, initialised on the CPU from ``seed`` alone (same weights on any device);
    starting weights (``encoder.weights``) are loaded by the run, not here."""
    torch.manual_seed(seed)
    return build(encoder_node(cfg), in_channels=cfg.data.channels, image_size=cfg.data.image_size)


def encoder_metadata(cfg: DictConfig) -> dict[str, str]:
    """What encoder.safetensors carries so it can be rebuilt without its run directory
    (read back against a fixed schema: ``commands.eval.read_encoder_metadata``)."""
    return {
        "format": "contrast-encoder-v1",
        "encoder": json.dumps(OmegaConf.to_container(encoder_node(cfg), resolve=True)),
        "data": str(cfg.data.name),
        "channels": str(cfg.data.channels),
        "image_size": str(cfg.data.image_size),
        "seed": str(cfg.trainer.seed),
    }

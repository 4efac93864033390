"""The end-of-run evaluation: the chosen evaluators on the trained encoder and, with
``eval.baselines``, on raw pixels, on the same encoder freshly initialised from the seed
and, for a run that started from weights (``encoder.weights``), on the encoder as loaded
(``pretrained``): each baseline read from the cache where it was computed before for the
same data, settings, encoder config and weights file (``contrastive_cli.baselines``)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from contrastive_cli.baselines import BaselineCache, baseline_keys, cache_dir
from contrastive_cli.data.datasets import ImageData
from contrastive_cli.device import Runtime
from contrastive_cli.evaluate import PROTOCOL_VERSION
from contrastive_cli.evaluators import Evaluator, build_evaluators, evaluate_protocol
from contrastive_cli.finetune import finetune_metrics
from contrastive_cli.labelfree import LabelFreeSample
from contrastive_cli.parts import build_encoder, encoder_node
from contrastive_cli.starting import Starting

log = logging.getLogger(__name__)
Outcome = tuple[dict[str, float], dict[str, dict[str, float]], dict[str, bool]]


@dataclass
class Evaluation:
    """What the evaluation needs, built from the config once (``evaluation_of``)."""

    evaluators: list[Evaluator]
    baselines: bool  # also raw pixels and the encoders of ``baseline_encoders``
    cache_keys: Callable[[], dict[str, dict[str, Any]]]  # {}: nothing read or written
    baseline_encoders: dict[str, Callable[[], nn.Module]]  # name -> the encoder, on the CPU
    batch_size: int
    labelfree_size: int = 2048  # eval.labelfree_size
    finetune: dict[str, Any] | None = None  # eval.finetune when enabled
    seed: int = 0

    def __call__(
        self,
        encoder: nn.Module,
        data: ImageData,
        augment: Any,
        runtime: Runtime,
        projector: nn.Module | None = None,
    ) -> Outcome:
        """(metrics, baselines, {baseline: whether it came from the cache}). Without labels,
        the label-free evaluators only; ``projector``: the method's, for ``rankme_projector``."""
        keys = self.cache_keys() if data.labelled else {}
        cache = BaselineCache(cache_dir())
        cached: dict[str, dict[str, float]] = {}
        for name, key in keys.items():
            start = time.perf_counter()
            found = cache.get(name, key)
            if found is not None:
                cached[name] = found | {"seconds": time.perf_counter() - start}
                log.info(f"{name} baseline: from the cache ({cache.path(name, key)})")
        encoders = {"trained": encoder}
        memory_format = torch.channels_last if runtime.channels_last else torch.preserve_format
        for name, make in self.baseline_encoders.items() if self.baselines else ():
            if name not in cached:
                encoders[name] = make().to(runtime.device, memory_format=memory_format)
        train, test = data.train, data.test
        evaluated = evaluate_protocol(
            encoders,
            train.images if train else None,
            train.labels if train else None,
            test.images if test else None,
            test.labels if test else None,
            data.num_classes,
            augment.normalize,
            runtime.device,
            self.evaluators,
            self.batch_size,
            pixels=self.baselines and "raw_pixels" not in cached,
            channels_last=runtime.channels_last,
            autocast=runtime.autocast,
            sample=labelfree_sample(data, augment, self.labelfree_size),
            projectors={"trained": projector} if projector is not None else None,
        )
        metrics = evaluated.pop("trained", {})
        for name, result in evaluated.items():
            if name in keys:
                cache.put(name, keys[name], {k: v for k, v in result.items() if k != "seconds"})
        baselines = {
            name: cached[name] if name in cached else evaluated[name]
            for name in ("raw_pixels", *self.baseline_encoders)
            if name in cached or name in evaluated
        }
        if self.finetune is not None and data.labelled:
            metrics |= finetune_metrics(
                encoder,
                self.baseline_encoders["random_init"],
                data,
                augment,
                runtime.device,
                self.finetune,
                self.seed,
            )
        return metrics, baselines, {name: name in cached for name in baselines}


def evaluation_of(
    cfg: DictConfig,
    data: ImageData,
    runtime: Runtime,
    seed: int,
    starting: Starting | None = None,
) -> Evaluation:
    """The evaluation ``cfg.eval`` describes, for ``data`` on ``runtime``; ``seed`` fixes the
    random-init baseline's weights and the probe's split; ``starting``: the weights the run
    started from (the ``pretrained`` baseline)."""
    settings: dict[str, Any] = OmegaConf.to_container(cfg.eval, resolve=True)  # type: ignore[assignment]
    baselines = bool(cfg.eval.baselines)
    cached = baselines and bool(cfg.eval.get("cache_baselines", True))
    encoder_config = OmegaConf.to_container(encoder_node(cfg), resolve=True)
    finetune = settings.get("finetune")
    encoders: dict[str, Callable[[], nn.Module]] = {"random_init": lambda: build_encoder(cfg, seed)}
    if starting is not None:
        encoders["pretrained"] = lambda: starting.load_into(build_encoder(cfg, seed))

    def keys() -> dict[str, dict[str, Any]]:
        found = baseline_keys(cfg, data, runtime, seed, encoder_config, PROTOCOL_VERSION) or {}
        if found and starting is not None:  # the encoder as loaded: also the file's digest
            found["pretrained"] = {**found["random_init"], "starting": starting.record()}
        return found

    return Evaluation(
        build_evaluators(settings["metrics"], settings, seed),
        baselines,
        keys if cached else dict,
        encoders,
        int(cfg.eval.batch_size),
        int(cfg.eval.get("labelfree_size", 2048)),
        finetune if finetune and finetune.get("enabled") else None,
        seed,
    )


def labelfree_sample(data: ImageData, augment: Any, size: int) -> LabelFreeSample:
    """The label-free metrics' fixed sample: of the test split (held out of training) where
    the data has one, else of the images trained on (an unlabelled folder)."""
    split = data.test if data.test is not None else data.pretrain
    return LabelFreeSample.of(split.images, augment, size)


def evaluate_encoder(
    cfg: DictConfig,
    encoder: nn.Module,
    data: ImageData,
    augment: Any,
    runtime: Runtime,
    seed: int,
    projector: nn.Module | None = None,
) -> Outcome:
    """The evaluation of ``cfg`` for ``encoder`` (what `contrast eval` runs): (metrics,
    baselines, {baseline: whether it came from the cache}). The ``pretrained`` baseline of a
    run that started from weights is left out, with a warning, when they cannot be read.
    ``projector``: the run's, on ``runtime``'s device (``rankme_projector``)."""
    from contrastive_cli.errors import ConfigError
    from contrastive_cli.starting import starting_weights

    starting = None
    if cfg.eval.baselines:
        try:
            starting = starting_weights(cfg, build_encoder(cfg, seed))
        except ConfigError as e:
            log.warning(f"warning: no pretrained baseline: {e}")
    evaluation = evaluation_of(cfg, data, runtime, seed, starting)
    return evaluation(encoder, data, augment, runtime, projector)

"""``contrast eval RUN_DIR|ENCODER.safetensors [overrides]``: frozen-encoder evaluation
of a saved encoder on any configured dataset (transfer needs the same channels)."""

from __future__ import annotations

import argparse
import json
import logging
from datetime import datetime
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict
from safetensors import safe_open
from safetensors.torch import load_file

from contrastive_cli.config import build, compose
from contrastive_cli.errors import ConfigError, UserError
from contrastive_cli.report import results_table, write_json
from contrastive_cli.rundirs import load_run

log = logging.getLogger(__name__)
HELP = "evaluate a saved encoder (k-NN, linear probe, baselines) on any dataset: RUN_DIR data=cifar100"


def _source(path: Path) -> tuple[Path, DictConfig, dict[str, str]]:
    """(encoder file, saved config, group choices) of a run dir or a bare encoder file."""
    if path.is_dir():
        run = load_run(path)
        weights = path / "encoder.safetensors"
        if not weights.is_file():
            raise UserError(f"{path} has no encoder.safetensors (the run did not finish training)")
        return weights, run.config(), run.choices
    if path.suffix != ".safetensors" or not path.is_file():
        raise UserError(f"{path} is neither a run directory nor an .safetensors encoder file")
    if (path.parent / ".hydra" / "config.yaml").is_file():
        run = load_run(path.parent)
        return path, run.config(), run.choices
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != "contrast-encoder-v1":
        raise UserError(f"{path} has no contrast metadata; evaluate it through its run directory")
    cfg = OmegaConf.create({
        "encoder": json.loads(meta["encoder"]), "trainer": {"seed": int(meta["seed"])},
        "data": {"name": meta["data"], "channels": int(meta["channels"]), "image_size": int(meta["image_size"])},
    })
    return path, cfg, {"data": meta["data"]}


def eval_config(saved: DictConfig, choices: dict[str, str], overrides: list[str]) -> DictConfig:
    """What to evaluate with: the run's saved data/eval/device sections, except those an
    override touches, which are composed afresh from conf/; always the run's encoder and seed.
    A bare encoder file carries no sections, so everything but the encoder is composed."""
    touched = {o.lstrip("+~").split("=", 1)[0].split(".", 1)[0].split("/", 1)[0] for o in overrides}
    groups = [f"{g}={o}" for g, o in choices.items() if g in ("data", "device") and g not in touched]
    cfg = compose([*groups, *overrides])
    full_run = "source" in saved.data
    with open_dict(cfg):
        for section in ("data", "eval", "device"):
            if full_run and section not in touched:
                cfg[section] = saved[section]
        cfg.encoder = saved.encoder
        cfg.trainer.seed = saved.trainer.seed
    return cfg


def main(args: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="contrast eval", description=HELP)
    parser.add_argument("source", type=Path, help="a run directory or an encoder.safetensors file")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. data=cifar100 device=cpu")
    parser.add_argument("--out", type=Path, help="results file (default: <run>/evals/<data>_<time>.json)")
    ns = parser.parse_args(args)
    weights, saved, choices = _source(ns.source.expanduser())
    cfg = eval_config(saved, choices, ns.overrides)
    trained_on = saved.data
    if cfg.data.channels != trained_on.channels:
        raise ConfigError(f"data={cfg.data.name} has {cfg.data.channels} channels but the encoder was trained on "
                          f"{trained_on.name} with {trained_on.channels}; choose data with {trained_on.channels}")

    from contrastive_cli.run import build_encoder, evaluate_encoder, load_data

    runtime = build(cfg.device)
    data = load_data(cfg)
    if not data.labelled:
        raise UserError(f"data={cfg.data.name} has no labels to evaluate with")
    encoder = build_encoder(cfg, cfg.trainer.seed)
    try:
        encoder.load_state_dict(load_file(str(weights)))
    except RuntimeError as e:
        raise ConfigError(f"the encoder in {weights} does not fit data={cfg.data.name} "
                          f"({cfg.data.image_size}px; trained at {trained_on.image_size}px): "
                          f"{str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e}") from None
    encoder.to(runtime.device)
    augment = build(cfg.data.augment)
    metrics, baselines = evaluate_encoder(cfg, encoder, data, augment, runtime, cfg.trainer.seed)
    results = {"status": "completed", "encoder_file": str(weights), "trained_on": str(trained_on.name),
               "data": cfg.data.name, "loss": choices.get("loss", "trained"), "metrics": metrics,
               "baselines": baselines, "device": runtime.describe(), "overrides": ns.overrides}
    print(results_table(results))
    out = ns.out
    if out is None:
        base = weights.parent if (weights.parent / ".hydra").is_dir() else Path(".")
        out = base / "evals" / f"{cfg.data.name}_{datetime.now():%Y-%m-%d_%H-%M-%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, results)
    print(f"results: {out}")
    return 0

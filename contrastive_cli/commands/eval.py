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

from contrastive_cli.config import apply_overrides, build, compose
from contrastive_cli.errors import ConfigError, UserError
from contrastive_cli.report import results_table, write_json
from contrastive_cli.rundirs import load_run

log = logging.getLogger(__name__)
GROUPS = ("data", "device")  # what an override may switch
KEYS = ("data.", "device.", "eval.")  # and set; the encoder is always the run's
HELP = (
    "evaluate a saved encoder (k-NN, linear probe, baselines) on any dataset: RUN_DIR data=cifar100"
)


def _source(
    path: Path, overrides: list[str]
) -> tuple[Path, DictConfig, DictConfig, dict[str, str]]:
    """(encoder file, config to evaluate with, config it trained with, group choices).

    A run directory (or an encoder file inside one): the run's config with ``overrides``
    applied. A bare encoder file: a fresh config from ``overrides`` (data defaults to the
    dataset it trained on) with the encoder and seed from the file's metadata.
    """
    run_dir = path if path.is_dir() else path.parent
    if path.is_dir() or (
        path.suffix == ".safetensors" and (run_dir / ".hydra" / "config.yaml").is_file()
    ):
        run = load_run(run_dir)
        weights = path if path.is_file() else path / "encoder.safetensors"
        if not weights.is_file():
            raise UserError(f"{path} has no encoder.safetensors (the run did not finish training)")
        saved = run.config(interpolated=True)
        return (
            weights,
            apply_overrides(saved, overrides, GROUPS, KEYS, "contrast eval"),
            saved,
            run.choices,
        )
    if path.suffix != ".safetensors" or not path.is_file():
        raise UserError(f"{path} is neither a run directory nor an .safetensors encoder file")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if meta.get("format") != "contrast-encoder-v1":
        raise UserError(f"{path} has no contrast metadata; evaluate it through its run directory")
    saved = OmegaConf.create(
        {
            "encoder": json.loads(meta["encoder"]),
            "trainer": {"seed": int(meta["seed"])},
            "data": {
                "name": meta["data"],
                "channels": int(meta["channels"]),
                "image_size": int(meta["image_size"]),
            },
        }
    )
    chosen = [o for o in overrides if o.split("=", 1)[0] == "data"] or [f"data={meta['data']}"]
    cfg = compose([*chosen, *(o for o in overrides if o.split("=", 1)[0] != "data")])
    with open_dict(cfg):
        cfg.encoder = saved.encoder
        cfg.trainer.seed = saved.trainer.seed
    return path, cfg, saved, {"data": meta["data"]}


def main(args: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="contrast eval", description=HELP)
    parser.add_argument("source", type=Path, help="a run directory or an encoder.safetensors file")
    parser.add_argument(
        "overrides", nargs="*", help="config overrides, e.g. data=cifar100 device=cpu"
    )
    parser.add_argument(
        "--out", type=Path, help="results file (default: <run>/evals/<data>_<time>.json)"
    )
    ns = parser.parse_args(args)
    weights, cfg, saved, choices = _source(ns.source.expanduser(), ns.overrides)
    trained_on = saved.data
    if cfg.data.channels != trained_on.channels:
        raise ConfigError(
            f"data={cfg.data.name} has {cfg.data.channels} channels but the encoder was trained on "
            f"{trained_on.name} with {trained_on.channels}; choose data with {trained_on.channels}"
        )

    from contrastive_cli.run import build_encoder, evaluate_encoder, load_data

    runtime = build(cfg.device)
    data = load_data(cfg)
    if not data.labelled:
        raise UserError(f"data={cfg.data.name} has no labels to evaluate with")
    encoder = build_encoder(cfg, cfg.trainer.seed)
    try:
        encoder.load_state_dict(load_file(str(weights)))
    except RuntimeError as e:
        raise ConfigError(
            f"the encoder in {weights} does not fit data={cfg.data.name} "
            f"({cfg.data.image_size}px; trained at {trained_on.image_size}px): "
            f"{str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e}"
        ) from None
    encoder.to(runtime.device)
    augment = build(cfg.data.augment)
    metrics, baselines, from_cache = evaluate_encoder(
        cfg, encoder, data, augment, runtime, cfg.trainer.seed
    )
    results = {
        "status": "completed",
        "encoder_file": str(weights),
        "trained_on": str(trained_on.name),
        "data": cfg.data.name,
        "loss": choices.get("loss", "trained"),
        "metrics": metrics,
        "baselines": baselines,
        "baselines_from_cache": from_cache,
        "device": runtime.describe(),
        "overrides": ns.overrides,
    }
    print(results_table(results))
    out = ns.out
    if out is None:
        base = weights.parent if (weights.parent / ".hydra").is_dir() else Path(".")
        out = base / "evals" / f"{cfg.data.name}_{datetime.now():%Y-%m-%d_%H-%M-%S}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, results)
    print(f"results: {out}")
    return 0

"""``contrast eval RUN_DIR|ENCODER.safetensors [overrides]``: frozen-encoder evaluation
of a saved encoder on any configured dataset (transfer needs the same channels)."""

from __future__ import annotations

import argparse
import logging
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf, open_dict

from contrastive_cli.config import apply_overrides, build, compose
from contrastive_cli.errors import ConfigError, UserError
from contrastive_cli.rebuild import check_plain, metadata_encoder
from contrastive_cli.report import results_table, write_json
from contrastive_cli.rundirs import load_run
from contrastive_cli.untrusted import UntrustedFile, parse_json, printable, safetensors_header
from contrastive_cli.writer import safe_path

if TYPE_CHECKING:
    from contrastive_cli.data.datasets import ImageData

log = logging.getLogger(__name__)
GROUPS = ("data", "device")  # what an override may switch
KEYS = ("data.", "device.", "eval.")  # and set; the encoder is always the run's
HELP = (
    "evaluate a saved encoder (k-NN, probes, retrieval, label-free metrics, baselines) on any "
    "dataset: RUN_DIR data=cifar100"
)


ENCODER_FORMAT = "contrast-encoder-v1"


def read_encoder_metadata(path: Path) -> dict[str, Any]:
    """The metadata of a bare encoder file, parsed against a fixed schema: format, encoder
    (a JSON object naming a shipped encoder), data (a shipped data option), channels,
    image_size and seed (integers in range). Anything else is one UserError line."""
    from contrastive_cli.config import config_groups

    _, meta = safetensors_header(path)  # header only, checked against the file; no allocation
    check_plain(meta, f"the metadata of {path}")  # no ${ or instantiation key, anywhere
    if meta.get("format") != ENCODER_FORMAT:
        raise UserError(f"{path} has no contrast metadata; evaluate it through its run directory")

    def integer(key: str, lo: int, hi: int) -> int:
        text = meta.get(key, "")
        if not (isinstance(text, str) and text.isdigit() and lo <= int(text) <= hi):
            raise UserError(
                f"{path}: metadata {key}={text[:40]!r} is not allowed; allowed: an integer in "
                f"[{lo}, {hi}]"
            )
        return int(text)

    data_options = config_groups()["data"]
    if meta.get("data") not in data_options:
        raise UserError(
            f"{path}: metadata data={str(meta.get('data'))[:40]!r} is not allowed; allowed: "
            f"{', '.join(data_options)}"
        )
    try:
        encoder = parse_json(meta.get("encoder", ""), f"{path}: metadata encoder")
    except UntrustedFile:
        encoder = None
    return {
        "encoder": metadata_encoder(encoder, str(path)),
        "data": meta["data"],
        "channels": integer("channels", 1, 4),
        "image_size": integer("image_size", 1, 4096),
        "seed": integer("seed", 0, 2**63 - 1),
    }


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:200]


def _source(
    path: Path, overrides: list[str]
) -> tuple[Path, DictConfig, DictConfig, dict[str, str]]:
    """(encoder file, config to evaluate with, config it trained with, group choices).

    A run directory (or an encoder file inside one): the run's config with ``overrides``
    applied. A bare encoder file: a fresh config from ``overrides`` (data defaults to the
    dataset it trained on) with the encoder and seed from the file's metadata. Either way
    the config is checked as data (``contrastive_cli.safety``) and validated before anything
    in it is built.
    """
    from contrastive_cli.safety import check_targets
    from contrastive_cli.validate import validate

    run_dir = path if path.is_dir() else path.parent
    if path.is_dir() or (
        path.suffix == ".safetensors" and (run_dir / ".hydra" / "config.yaml").is_file()
    ):
        run = load_run(run_dir)
        saved = run.config()  # refused first if its files are not plain data
        weights = path if path.is_file() else path / "encoder.safetensors"
        if not weights.is_file():
            raise UserError(f"{path} has no encoder.safetensors (the run did not finish training)")
        cfg = apply_overrides(saved, overrides, GROUPS, KEYS, "contrast eval")
        validate(cfg)
        return weights, cfg, saved, run.choices
    if path.suffix != ".safetensors" or not path.is_file():
        raise UserError(f"{path} is neither a run directory nor an .safetensors encoder file")
    path = path.resolve()  # a bare file the user named: a link to it is theirs to follow
    meta = read_encoder_metadata(path)
    saved = OmegaConf.create(
        {
            "encoder": meta["encoder"],
            "trainer": {"seed": meta["seed"]},
            "data": {
                "name": meta["data"],
                "channels": meta["channels"],
                "image_size": meta["image_size"],
            },
        }
    )
    check_targets(saved, f"the metadata of {path}")
    chosen = [o for o in overrides if o.split("=", 1)[0] == "data"] or [f"data={meta['data']}"]
    cfg = compose([*chosen, *(o for o in overrides if o.split("=", 1)[0] != "data")])
    with open_dict(cfg):
        cfg.pop("hydra", None)
        cfg.encoder = saved.encoder
        cfg.trainer.seed = saved.trainer.seed
    validate(cfg)
    return path, cfg, saved, {"data": meta["data"]}


def heldout_split(data: ImageData, fraction: float, name: str) -> ImageData:
    """``data`` with its test split replaced by a fixed, stratified ``fraction`` of the train
    split and its train split by the rest (the same images for every run and seed)."""
    import dataclasses

    import torch

    from contrastive_cli.data.datasets import Split, stratified_test_mask

    assert data.train is not None and data.train.labels is not None
    train = data.train
    if not isinstance(train.images, torch.Tensor):
        raise UserError(f"--heldout needs data={name} in memory; allowed: data.cache=true")
    mask = torch.from_numpy(stratified_test_mask(train.labels.numpy(), fraction, seed=0))
    return dataclasses.replace(
        data,
        train=Split(train.images[~mask], train.labels[~mask]),
        test=Split(train.images[mask], train.labels[mask]),
    )


def _run_projector(cfg: DictConfig, weights: Path, encoder: Any, device: Any) -> Any:
    """A run directory's projector (``rankme_projector``), from its last checkpoint, on
    ``device``; None for a bare encoder file or where the run kept none."""
    if "loss" not in cfg or not (weights.parent / ".hydra").is_dir():
        return None
    from contrastive_cli.labelfree import saved_projector

    projector = saved_projector(cfg.loss, weights.parent, encoder)
    return projector.to(device) if projector is not None else None


def main(args: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="contrast eval", description=HELP)
    parser.add_argument("source", type=Path, help="a run directory or an encoder.safetensors file")
    parser.add_argument(
        "overrides", nargs="*", help="config overrides, e.g. data=cifar100 device=cpu"
    )
    parser.add_argument(
        "--out", type=Path, help="results file (default: <run>/evals/<data>_<time>.json)"
    )
    parser.add_argument(
        "--heldout",
        type=float,
        metavar="FRACTION",
        help="evaluate on a fixed, stratified FRACTION of the train split instead of test (the "
        "rest is the k-NN bank and the probe's training set): for choosing a recipe, test untouched",
    )
    parser.add_argument(
        "--finetune",
        action="store_true",
        help="also fine-tune the encoder and a linear head end to end (eval.finetune.*), beside "
        "the same from random init: costly",
    )
    ns = parser.parse_intermixed_args(args)  # options before or after the overrides
    if ns.heldout is not None and not 0 < ns.heldout < 1:
        raise ConfigError(f"--heldout={ns.heldout} is not allowed; allowed: a fraction in (0, 1)")
    weights, cfg, saved, choices = _source(ns.source.expanduser(), ns.overrides)
    if ns.finetune:
        with open_dict(cfg):
            cfg.eval.finetune.enabled = True
    trained_on = saved.data
    if cfg.data.channels != trained_on.channels:
        raise ConfigError(
            f"data={cfg.data.name} has {cfg.data.channels} channels but the encoder was trained on "
            f"{trained_on.name} with {trained_on.channels}; choose data with {trained_on.channels}"
        )

    from contrastive_cli.evaluation import evaluate_encoder
    from contrastive_cli.parts import load_data
    from contrastive_cli.progress import configure as progress_lines
    from contrastive_cli.weights import load_trained_encoder

    runtime = build(cfg.device)
    data = load_data(cfg)
    if not data.labelled:
        if ns.heldout is not None:
            raise UserError(f"--heldout needs labels; data={cfg.data.name} has none")
        log.info(f"data={cfg.data.name} has no labels: the label-free metrics only")
    if ns.heldout is not None:
        data = heldout_split(data, ns.heldout, cfg.data.name)
    encoder = load_trained_encoder(cfg, weights).to(runtime.device)
    augment = build(cfg.data.augment)
    progress_lines(cfg.trainer.get("log_every_s"))
    projector = _run_projector(cfg, weights, encoder, runtime.device)
    metrics, baselines, from_cache = evaluate_encoder(
        cfg, encoder, data, augment, runtime, cfg.trainer.seed, projector
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
        "split": "test" if ns.heldout is None else f"heldout {ns.heldout} of train",
    }
    print("\n".join(printable(line) for line in results_table(results).splitlines()))
    out = ns.out
    if out is None:
        split = "" if ns.heldout is None else "_heldout-train"
        name = f"evals/{cfg.data.name}{split}_{datetime.now():%Y-%m-%d_%H-%M-%S}.json"
        in_run = (weights.parent / ".hydra").is_dir()  # into a run directory: never via a link
        out = safe_path(weights.parent, name) if in_run else Path(name)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, results)
    print(f"results: {out}")
    return 0

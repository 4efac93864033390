"""``contrast embed RUN_DIR [overrides...] --out FILE``: a trained encoder's features for
every image of a dataset, one row per image, as parquet, .npy or .csv.

The encoder is rebuilt from the run's saved config and loaded from its safetensors file;
the data is the run's unless overridden (``data=folder data.path=...``). Features are the
evaluation protocol's: the encoder's output before any projector, encoder in eval(), images
normalised as in training.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from contrastive_cli import install_hint
from contrastive_cli.commands import Parser
from contrastive_cli.config import apply_overrides, build
from contrastive_cli.errors import ConfigError, DataError
from contrastive_cli.rundirs import load_run
from contrastive_cli.validate import validate
from contrastive_cli.writer import FILE_MODE

HELP = "write a trained encoder's embeddings of a dataset (.parquet, .npy or .csv)"
FORMATS = (".parquet", ".npy", ".csv")
GROUPS = ("data", "device")  # config groups an override may switch
KEYS = ("data.", "device.", "eval.batch_size")  # keys an override may set


def _parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="contrast embed",
        description="Run a trained encoder over a dataset and write one row per image: split, path "
        "(image folders) or index, label (when known), class (when named) and the embedding.",
        epilog="examples:\n"
        "  contrast embed outputs/2026-01-01/12-00-00_ntxent_folder --out embeddings.parquet\n"
        "  contrast embed RUN_DIR data=folder data.path=~/photos --out embeddings.npy\n"
        "  contrast embed RUN_DIR data=mnist device=cpu eval.batch_size=512 --out mnist.csv\n\n"
        "overrides: data=..., data.KEY=..., device=..., device.KEY=..., eval.batch_size=...; the\n"
        "data must have the channels and image size the encoder was trained on.\n"
        ".npy holds a structured array (np.load(f)['embedding'] is N x D); a missing label is -1.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "run_dir", metavar="RUN_DIR", help="a finished `contrast train` run directory"
    )
    parser.add_argument(
        "overrides", nargs="*", metavar="OVERRIDE", help="data, device or eval.batch_size overrides"
    )
    parser.add_argument(
        "--out", required=True, metavar="FILE", help="output file: .parquet, .npy or .csv"
    )
    return parser


def main(args: list[str]) -> int:
    opts = _parser().parse_intermixed_args(args)
    out = Path(opts.out).expanduser()
    _check_out(out)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    run_dir = Path(opts.run_dir).expanduser()
    run_cfg = load_run(run_dir).config()
    cfg = apply_overrides(run_cfg, opts.overrides, GROUPS, KEYS, "contrast embed")
    validate(run_cfg)  # what builds the encoder
    validate(cfg)  # what loads the data
    rows = embed(run_dir, run_cfg, cfg)
    write(out, rows, {"run_dir": str(run_dir.resolve()), "data": str(cfg.data.name)})
    n, dim = rows["embedding"].shape
    print(f"wrote {n} embeddings of dimension {dim} to {out}")
    return 0


def _check_out(out: Path) -> None:
    if out.suffix.lower() not in FORMATS:
        raise ConfigError(
            f"--out {out}: the extension {out.suffix or '(none)'!s} is not allowed; "
            f"allowed: {', '.join(FORMATS)}"
        )
    if not out.parent.is_dir():
        raise ConfigError(f"--out {out}: the folder {out.parent} does not exist")
    if out.suffix.lower() == ".parquet":
        try:
            import pyarrow  # noqa: F401
        except ImportError:
            raise ConfigError(
                f"--out {out}: writing parquet needs pyarrow (pip install pyarrow, or "
                f"{install_hint('parquet')}); or write .npy or .csv"
            ) from None


def load_encoder(run_dir: Path, run_cfg: DictConfig) -> torch.nn.Module:
    """The run's encoder, rebuilt from its config as ``contrast train`` built it, with the
    trained weights from ``encoder.safetensors`` (no pickles)."""
    from contrastive_cli.weights import load_trained_encoder

    path = run_dir / "encoder.safetensors"
    if not path.is_file():
        raise DataError(
            f"{path} is missing: the run has not finished (see {run_dir / 'results.json'})"
        )
    return load_trained_encoder(run_cfg, path)


def embed(run_dir: Path, run_cfg: DictConfig, cfg: DictConfig) -> dict[str, np.ndarray]:
    """Columns of the output: split, path or index, label, class (when named), embedding."""
    from contrastive_cli.evaluate import extract_features
    from contrastive_cli.parts import load_data

    want = (run_cfg.data.channels, run_cfg.data.image_size)
    have = (cfg.data.channels, cfg.data.image_size)
    if have != want:
        raise ConfigError(
            f"the encoder of {run_dir} takes {want[0]}x{want[1]}x{want[1]} images but data={cfg.data.name} "
            f"has data.channels={have[0]}, data.image_size={have[1]}; set data.channels={want[0]} "
            f"data.image_size={want[1]} (or pick data of that shape)"
        )
    runtime = build(cfg.device)
    encoder = load_encoder(run_dir, run_cfg).to(runtime.device)
    if runtime.channels_last:
        encoder = encoder.to(memory_format=torch.channels_last)
    normalize = build(run_cfg.data.augment).normalize  # as the encoder saw images in training
    data = load_data(cfg)
    batch_size = cfg.eval.batch_size
    columns: dict[str, list] = {"split": [], "id": [], "label": [], "embedding": []}
    for name, split in data.named_splits().items():
        features = extract_features(
            encoder,
            split.images,
            normalize,
            runtime.device,
            batch_size,
            runtime.channels_last,
            runtime.autocast,
            desc=f"embedding {name}",
        )
        columns["embedding"].append(features.cpu().numpy())
        columns["split"] += [name] * len(split)
        columns["id"] += split.paths if split.paths is not None else list(range(len(split)))
        columns["label"].append(
            split.labels.numpy() if split.labels is not None else np.full(len(split), -1)
        )
    labels = np.concatenate(columns["label"]).astype(np.int64)
    if columns["id"] and isinstance(columns["id"][0], str):
        columns["id"] = [_text_path(p) for p in columns["id"]]
    rows = {
        "split": np.array(columns["split"]),
        "path" if isinstance(columns["id"][0], str) else "index": np.array(columns["id"]),
        "label": labels,
    }
    if data.class_names:
        rows["class"] = np.array([data.class_names[i] if i >= 0 else "" for i in labels])
    rows["embedding"] = np.concatenate(columns["embedding"]).astype(np.float32)
    return rows


def _text_path(path: str) -> str:
    """A file name as text every format can hold: bytes that are not UTF-8 (kept by Python
    as lone surrogates, which UTF-8 writers refuse) become ``\\xNN``, as ``ls -b`` shows them."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def write(out: Path, rows: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    """Write ``rows`` to ``out`` in the format its extension names, atomically."""
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=out.suffix, dir=out.parent)
    os.close(fd)
    try:
        {".parquet": _parquet, ".npy": _npy, ".csv": _csv}[out.suffix.lower()](
            Path(tmp), rows, metadata
        )
        os.chmod(tmp, FILE_MODE)  # mkstemp makes 0600; like every other output
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _parquet(path: Path, rows: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    """Label is null where unknown; embedding is a fixed-size list of float32."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    dim = rows["embedding"].shape[1]
    columns = {}
    for name, values in rows.items():
        if name == "embedding":
            columns[name] = pa.FixedSizeListArray.from_arrays(pa.array(values.reshape(-1)), dim)
        elif name == "label":
            columns[name] = pa.array(values, mask=values < 0)
        else:
            columns[name] = pa.array(values.tolist())
    table = pa.table(columns).replace_schema_metadata({**metadata, "embedding_dim": str(dim)})
    pq.write_table(table, path)


def _npy(path: Path, rows: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    """A structured array (no pickled objects): arr['embedding'] is (N, D), label -1 = unknown."""
    dim = rows["embedding"].shape[1]
    dtype = [
        (name, values.dtype) if name != "embedding" else (name, np.float32, (dim,))
        for name, values in rows.items()
    ]
    table = np.empty(len(rows["embedding"]), dtype=dtype)
    for name, values in rows.items():
        table[name] = values
    np.save(path, table, allow_pickle=False)


def _csv(path: Path, rows: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    """One column per embedding dimension (e0, e1, ...); an unknown label is left empty."""
    dim = rows["embedding"].shape[1]
    names = [n for n in rows if n != "embedding"]
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow([*names, *(f"e{i}" for i in range(dim))])
        for i, vector in enumerate(rows["embedding"]):
            fields = [rows[n][i] for n in names]
            fields = [
                "" if n == "label" and v < 0 else v for n, v in zip(names, fields, strict=True)
            ]
            writer.writerow([*fields, *(f"{v:.9g}" for v in vector)])

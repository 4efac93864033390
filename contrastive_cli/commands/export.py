"""``contrast export RUN_DIR --format onnx|timm|torchscript|safetensors --out PATH``: a run's
trained encoder in the formats people load elsewhere, each checked right after it is written.

- ``safetensors``: the encoder's state dict (with the metadata ``contrast eval`` reads).
- ``timm``: the timm model's state dict as safetensors, which ``timm.create_model(NAME,
  pretrained=True, pretrained_cfg_overlay=dict(file=PATH), num_classes=0, in_chans=C)``
  loads (timm encoders only); checked by making exactly that call.
- ``torchscript``: ``torch.jit.trace`` of the encoder in eval mode, reloaded and compared.
- ``onnx``: a dynamic batch axis; run with onnxruntime on the run's own test images and
  compared with PyTorch (needs the ``export`` extra: onnx, onnxruntime).

Every check prints the largest absolute and relative difference of the features and fails
above ``TOLERANCE`` (relative to the largest feature), leaving nothing at ``--out``. Beside
the export, ``PATH.json``: input shape, channels, normalisation, feature dimension, the
source run and its encoder.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from contrastive_cli import install_hint
from contrastive_cli.commands import Parser
from contrastive_cli.errors import ConfigError, DataError, UserError
from contrastive_cli.writer import FILE_MODE

HELP = "write a run's trained encoder as ONNX, timm, TorchScript or safetensors (checked)"
FORMATS = ("onnx", "timm", "torchscript", "safetensors")
TOLERANCE = 1e-4  # largest |difference| / largest |feature| an export may show
CHECK_IMAGES = 256  # test images each check runs (fewer for large images)
log = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="contrast export",
        description=HELP,
        epilog="examples:\n"
        "  contrast export RUN_DIR --format onnx --out encoder.onnx\n"
        "  contrast export RUN_DIR --format timm --out resnet18_digits.safetensors\n"
        "  contrast export RUN_DIR --format torchscript --out encoder.pt\n\n"
        "Beside the file, PATH.json: input shape, normalisation mean/std, feature dimension.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a finished `contrast train` run")
    parser.add_argument("--format", required=True, choices=FORMATS, help="what to write")
    parser.add_argument("--out", required=True, metavar="PATH", help="the file to write")
    parser.add_argument("--force", action="store_true", help="replace an existing --out file")
    return parser


def main(args: list[str]) -> int:
    opts = _parser().parse_args(args)
    out = Path(opts.out).expanduser()
    if opts.format == "timm" and out.suffix != ".safetensors":  # how timm tells the format
        raise ConfigError(
            f"--out {out} is not allowed with --format timm; allowed: a name ending in "
            ".safetensors (timm reads other files with torch.load)"
        )
    _check_out(out, opts.force)
    if opts.format == "onnx":
        _need_onnx()
    run_dir = Path(opts.run_dir).expanduser()
    source = Source.of(run_dir)
    WRITERS[opts.format](source, out)
    info = source.info(opts.format, out)
    _atomic(sidecar(out), lambda tmp: tmp.write_text(json.dumps(info, indent=2) + "\n"))
    print(f"wrote {out} and {sidecar(out)}")
    return 0


def sidecar(out: Path) -> Path:
    return out.with_name(out.name + ".json")


def _check_out(out: Path, force: bool) -> None:
    if not out.parent.is_dir():
        raise ConfigError(f"--out {out}: the folder {out.parent} does not exist")
    for path in (out, sidecar(out)):
        if os.path.lexists(path) and not force:
            raise ConfigError(
                f"--out {out}: {path} exists; allowed: a new path, or --force to replace it"
            )
        if path.is_dir():
            raise ConfigError(f"--out {out}: {path} is a folder; allowed: a file path")


def _need_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError as e:
        raise ConfigError(
            f"--format onnx needs onnx and onnxruntime ({e.name} is not installed); allowed: "
            f"{install_hint('export')}, or --format torchscript|safetensors"
        ) from None


class Source:
    """A finished run's trained encoder (eval mode, CPU) and what its exports record."""

    def __init__(self, run_dir: Path, cfg: DictConfig, encoder: nn.Module, encoder_choice: str):
        self.run_dir, self.cfg, self.encoder = run_dir, cfg, encoder.eval()
        self.encoder_choice = encoder_choice
        aug = cfg.data.augment
        self.mean = [float(v) for v in aug.mean]
        self.std = [float(v) for v in aug.std]
        self.channels, self.size = int(cfg.data.channels), int(cfg.data.image_size)
        self.extra: dict[str, Any] = {}  # what the format's writer adds to PATH.json
        self.checked_on = ""  # the images the check ran on, in words

    @staticmethod
    def of(run_dir: Path) -> Source:
        from contrastive_cli.rundirs import load_run
        from contrastive_cli.validate import validate
        from contrastive_cli.weights import load_trained_encoder

        run = load_run(run_dir)
        cfg = run.config()
        weights = run.path / "encoder.safetensors"
        if not weights.is_file():
            raise ConfigError(
                f"{run_dir} has no encoder.safetensors (the run did not finish training); "
                "allowed: a finished run directory"
            )
        validate(cfg)
        encoder = load_trained_encoder(cfg, weights)
        return Source(run.path, cfg, encoder, run.choices.get("encoder", ""))

    def images(self) -> torch.Tensor:
        """Up to CHECK_IMAGES of the run's test images, normalised as in training; random
        images of the same shape when the run's data is not on this machine."""
        from contrastive_cli.parts import load_data

        try:
            data = load_data(self.cfg)
            split = data.test if data.test is not None else data.pretrain
            x = split.images[: max(8, min(CHECK_IMAGES, 2**22 // (self.channels * self.size**2)))]
            x = x if isinstance(x, torch.Tensor) else torch.stack(list(x))
            what = f"{len(x)} test images of data={self.cfg.data.name}"
        except (DataError, ConfigError, OSError) as e:
            g = torch.Generator().manual_seed(0)
            x = torch.randint(0, 256, (16, self.channels, self.size, self.size), generator=g)
            x = x.to(torch.uint8)
            what = f"16 random images (the run's data cannot be read: {e})"
        mean = torch.tensor(self.mean).view(1, -1, 1, 1)
        std = torch.tensor(self.std).view(1, -1, 1, 1)
        self.checked_on = what
        return (x.float() / 255 - mean) / std

    def info(self, fmt: str, out: Path) -> dict[str, Any]:
        return {
            "format": fmt,
            "file": out.name,
            "input_shape": ["batch", self.channels, self.size, self.size],
            "input": "float32 pixels in [0, 1], then (x - mean) / std per channel",
            "channels": self.channels,
            "image_size": self.size,
            "mean": self.mean,
            "std": self.std,
            "feature_dim": int(getattr(self.encoder, "out_dim", 0)),
            "source_run": str(self.run_dir.resolve()),
            "encoder": self.encoder_choice,
            "encoder_config": OmegaConf.to_container(_node(self.cfg), resolve=True),
            **self.extra,
        }


def _node(cfg: DictConfig) -> DictConfig:
    from contrastive_cli.parts import encoder_node

    return encoder_node(cfg)


def compare(got: torch.Tensor, want: torch.Tensor, what: str) -> dict[str, float]:
    """Max abs and relative (to the largest |feature|) difference; UserError above TOLERANCE."""
    got, want = got.detach().float(), want.detach().float()
    if got.shape != want.shape:
        raise UserError(
            f"{what}: features of shape {tuple(got.shape)}, PyTorch's {tuple(want.shape)}"
        )
    abs_diff = (got - want).abs().max().item()
    rel = abs_diff / max(want.abs().max().item(), 1e-12)
    print(f"{what}: max abs difference {abs_diff:.3g}, max relative {rel:.3g}")
    if not rel <= TOLERANCE:  # also NaN
        raise UserError(
            f"{what}: features differ from PyTorch's by {rel:.3g} relative (allowed: at most "
            f"{TOLERANCE:g}); nothing written"
        )
    return {"max_abs_difference": abs_diff, "max_relative_difference": rel}


def _atomic(out: Path, write: Callable[[Path], Any]) -> Any:
    """``write(tmp)`` into a temp file beside ``out``, then renamed onto it (or removed)."""
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.", suffix=out.suffix, dir=out.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        result = write(tmp)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, out)
        return result
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


# --------------------------------------------------------------------------- the formats
def write_safetensors(source: Source, out: Path) -> None:
    from safetensors.torch import save_file

    from contrastive_cli.parts import encoder_metadata
    from contrastive_cli.weights import read_weights

    tensors = {k: v.detach().contiguous() for k, v in source.encoder.state_dict().items()}

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp), metadata=encoder_metadata(source.cfg))
        back = read_weights(tmp)
        if back.keys() != tensors.keys() or any(
            not torch.equal(back[k], v) for k, v in tensors.items()
        ):
            raise UserError(f"{out}: the written tensors differ from the encoder's")

    _atomic(out, write)
    source.extra = {"tensors": len(tensors)}


def write_timm(source: Source, out: Path) -> None:
    """The timm model's own state dict, checked by the documented ``create_model`` call."""
    encoder = source.encoder
    name = getattr(encoder, "timm_name", None)
    if name is None or not isinstance(getattr(encoder, "model", None), nn.Module):
        raise ConfigError(
            f"--format timm needs a timm encoder (encoder=timm or its recipes); the encoder of "
            f"{source.run_dir} is {type(encoder).__name__}; allowed: --format safetensors or "
            "torchscript (README: Exporting)"
        )
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous() for k, v in encoder.model.state_dict().items()}
    kwargs = timm_kwargs(encoder)
    _check_timm_shapes(name, tensors, source.channels, kwargs)
    x = source.images()

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp))
        model = load_timm(name, tmp, source.channels, kwargs)
        with torch.inference_mode():
            source.extra = {
                "timm_name": name,
                "timm_kwargs": kwargs,
                "check": compare(model(x), encoder(x), f"timm.create_model on {source.checked_on}"),
            }

    _atomic(out, write)


def _check_timm_shapes(
    name: str, tensors: dict[str, torch.Tensor], channels: int, kwargs: dict[str, Any]
) -> None:
    """ConfigError when timm's own model differs from the trained one (contrast's small-image
    stem replaces timm's): timm.create_model could not load the file."""
    import timm

    with torch.device("meta"):
        own = timm.create_model(name, num_classes=0, in_chans=channels, **kwargs).state_dict()
    wrong = [k for k in own if k not in tensors or tuple(own[k].shape) != tuple(tensors[k].shape)]
    if wrong or own.keys() != tensors.keys():
        first = (wrong or sorted(set(tensors) - set(own)))[0]
        raise ConfigError(
            f"--format timm: timm.create_model({name!r}) builds another network than the "
            f"trained one (at {first}: the small-image stem, encoder.stem, is contrast's); "
            "allowed: --format safetensors, torchscript or onnx, or a run with "
            "encoder.stem=imagenet"
        )


def timm_kwargs(encoder: nn.Module) -> dict[str, Any]:
    """The arguments besides name, num_classes and in_chans that rebuild the timm model."""
    kwargs = getattr(encoder, "timm_kwargs", None)
    return dict(kwargs) if isinstance(kwargs, dict) else {}


def load_timm(name: str, path: Path, channels: int, kwargs: dict[str, Any]) -> nn.Module:
    """Exactly the README's call, then every tensor compared with the file (strict)."""
    import timm
    from safetensors.torch import load_file

    try:
        model = timm.create_model(
            name,
            pretrained=True,
            pretrained_cfg_overlay=dict(file=str(path)),
            num_classes=0,
            in_chans=channels,
            **kwargs,
        ).eval()
    except Exception as e:  # what timm's loader raises: nothing is written
        text = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        raise UserError(
            f"timm.create_model({name!r}, pretrained=True, pretrained_cfg_overlay=...) cannot "
            f"load the export ({type(e).__name__}: {text}); nothing written"
        ) from None
    saved, own = load_file(str(path)), model.state_dict()
    if saved.keys() != own.keys() or any(not torch.equal(saved[k], own[k]) for k in own):
        missing = sorted(set(own) - set(saved))[:3]
        raise UserError(
            f"timm.create_model({name!r}, ...) does not load {path} strictly (differs at "
            f"{missing or 'values'}); nothing written"
        )
    return model


def write_torchscript(source: Source, out: Path) -> None:
    x = source.images()

    def write(tmp: Path) -> None:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", FutureWarning)  # jit's deprecation notes
            traced = torch.jit.trace(source.encoder, x[:2], check_trace=False)
            torch.jit.save(traced, str(tmp))
            back = torch.jit.load(str(tmp), map_location="cpu").eval()
            check = compare(back(x), source.encoder(x), f"TorchScript on {source.checked_on}")
        source.extra = {"check": check}

    _atomic(out, write)


def write_onnx(source: Source, out: Path) -> None:
    import onnxruntime as ort

    x = source.images()

    def write(tmp: Path) -> None:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the TorchScript-based exporter's deprecation note
            torch.onnx.export(
                source.encoder,
                (x[:2],),
                str(tmp),
                dynamo=False,  # the torch.export-based one needs onnxscript
                input_names=["images"],
                output_names=["features"],
                dynamic_axes={"images": {0: "batch"}, "features": {0: "batch"}},
                opset_version=17,
            )
            want = source.encoder(x)
        session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(session.run(None, {"images": x.numpy()})[0])
        source.extra = {"check": compare(got, want, f"onnxruntime on {source.checked_on}")}

    _atomic(out, write)


WRITERS: dict[str, Callable[[Source, Path], None]] = {
    "safetensors": write_safetensors,
    "timm": write_timm,
    "torchscript": write_torchscript,
    "onnx": write_onnx,
}

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main(sys.argv[1:]))

"""contrast export: each format gives the trained encoder's features (checked here with the
format's own loader, not the command's), a JSON beside it, and one line for bad inputs."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch
from safetensors.torch import load_file

from contrastive_cli import cli
from contrastive_cli.parts import load_data
from contrastive_cli.rundirs import load_run
from contrastive_cli.weights import load_trained_encoder
from tests.conftest import TINY, one_error_line, run_cli, run_dirs


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished one-epoch digits run with the default (cnn) encoder."""
    root = tmp_path_factory.mktemp("export")
    args = [*TINY, "trainer.epochs=1", "eval.baselines=false", "eval.plots=false"]
    run_cli(["train", *args], cwd=root, check=True)
    [run] = run_dirs(root / "outputs")
    return run


def reference(run):
    """(normalised digits test images, the trained encoder's features), computed here."""
    cfg = load_run(run).config()
    encoder = load_trained_encoder(cfg, run / "encoder.safetensors").eval()
    images = load_data(cfg).test.images[:37].float() / 255
    mean = torch.tensor(list(cfg.data.augment.mean)).view(1, -1, 1, 1)
    std = torch.tensor(list(cfg.data.augment.std)).view(1, -1, 1, 1)
    x = (images - mean) / std
    with torch.no_grad():
        return x, encoder(x)


def export(run, fmt, out, *extra):
    return cli.main(["export", str(run), "--format", fmt, "--out", str(out), *extra])


def close(got, want):
    rel = (torch.as_tensor(got) - want).abs().max() / want.abs().max()
    return rel.item() <= 1e-4


def test_safetensors_is_the_encoders_state_dict(trained, tmp_path):
    out = tmp_path / "enc.safetensors"
    assert export(trained, "safetensors", out) == 0
    saved, original = load_file(str(out)), load_file(str(trained / "encoder.safetensors"))
    assert saved.keys() == original.keys()
    assert all(torch.equal(saved[k], original[k]) for k in saved)
    info = json.loads((tmp_path / "enc.safetensors.json").read_text())
    assert info["input_shape"] == ["batch", 1, 8, 8] and info["feature_dim"] == 256
    assert info["channels"] == 1 and len(info["mean"]) == len(info["std"]) == 1
    assert info["source_run"] == str(trained.resolve()) and info["encoder"] == "cnn"


def test_torchscript_reloads_with_the_same_features(trained, tmp_path, capsys):
    out = tmp_path / "enc.pt"
    assert export(trained, "torchscript", out) == 0
    assert "max abs difference" in capsys.readouterr().out
    x, want = reference(trained)
    with torch.no_grad():
        assert close(torch.jit.load(str(out))(x), want)


def test_onnx_has_a_dynamic_batch_and_the_same_features(trained, tmp_path, capsys):
    ort = pytest.importorskip("onnxruntime")
    out = tmp_path / "enc.onnx"
    assert export(trained, "onnx", out) == 0
    printed = capsys.readouterr().out
    assert "onnxruntime on 256 test images of data=digits: max abs difference" in printed
    x, want = reference(trained)  # 37 images: not the batch it was traced with
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = session.run(None, {"images": x.numpy()})[0]
    assert got.shape == (37, 256) and close(got, want)
    info = json.loads((tmp_path / "enc.onnx.json").read_text())
    assert info["check"]["max_relative_difference"] <= 1e-4


def test_an_existing_out_is_refused_unless_forced(trained, tmp_path, capsys):
    out = tmp_path / "enc.safetensors"
    out.write_bytes(b"mine")
    line = one_error_line(capsys, export(trained, "safetensors", out))
    assert "exists" in line and "--force" in line
    assert out.read_bytes() == b"mine" and not (tmp_path / "enc.safetensors.json").exists()
    assert export(trained, "safetensors", out, "--force") == 0
    assert load_file(str(out)).keys() == load_file(str(trained / "encoder.safetensors")).keys()


@pytest.mark.parametrize(
    ("fmt", "message"),
    [("keras", "invalid choice: 'keras'"), ("timm", "needs a timm encoder")],
)
def test_bad_formats_are_one_line(trained, tmp_path, capsys, fmt, message):
    line = one_error_line(capsys, export(trained, fmt, tmp_path / "x.safetensors"))
    assert message in line
    assert list(tmp_path.iterdir()) == []


def test_a_run_without_an_encoder_is_one_line(trained, tmp_path, capsys):
    copy = tmp_path / "run"
    shutil.copytree(trained, copy, ignore=shutil.ignore_patterns("encoder.safetensors", ".lock"))
    line = one_error_line(capsys, export(copy, "safetensors", tmp_path / "e.safetensors"))
    assert "no encoder.safetensors" in line
    assert not (tmp_path / "e.safetensors").exists()


def test_onnx_without_the_extra_names_it(trained, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    line = one_error_line(capsys, export(trained, "onnx", tmp_path / "e.onnx"))
    assert "[export]" in line and "onnxruntime" in line
    assert not (tmp_path / "e.onnx").exists()


def test_a_failed_check_leaves_nothing(trained, tmp_path, capsys, monkeypatch):
    from contrastive_cli.commands import export as module

    monkeypatch.setattr(module, "TOLERANCE", -1.0)  # any difference, even 0, is too much
    code = export(trained, "torchscript", tmp_path / "e.pt")
    assert code == 1 and "nothing written" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_timm_export_loads_with_the_documented_call(tmp_path_factory, capsys):
    import timm

    root = tmp_path_factory.mktemp("export-timm")
    args = [*TINY, "trainer.epochs=1", "eval.baselines=false", "eval.plots=false"]
    run_cli(["train", "encoder=timm", "encoder.name=test_resnet", *args], cwd=root, check=True)
    [run] = run_dirs(root / "outputs")
    out = root / "test_resnet.safetensors"
    assert export(run, "timm", out) == 0
    model = timm.create_model(
        "test_resnet",
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(out)),
        num_classes=0,
        in_chans=1,
    ).eval()
    x, want = reference(run)
    with torch.no_grad():
        assert close(model(x), want)
    info = json.loads((root / "test_resnet.safetensors.json").read_text())
    assert info["timm_name"] == "test_resnet" and info["feature_dim"] == want.shape[1]
    line = one_error_line(capsys, export(run, "timm", root / "x.bin"))
    assert "ending in .safetensors" in line

"""encoder.weights: torchvision/timm/own state dicts load onto the encoder (names mapped,
classifier dropped), a mismatch is one line unless encoder.strict=false, the run records the
file's SHA-256 and evaluates the encoder as loaded (the ``pretrained`` baseline); resume and
reproduce refuse a changed or missing file."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil

import pytest
import torch
import torchvision
from safetensors.torch import load_file, save_file

from contrastive_cli import cli
from contrastive_cli.checkpoint import load_checkpoint
from contrastive_cli.errors import ConfigError
from contrastive_cli.models.encoders import ConvNet, ResNet18
from contrastive_cli.report import results_table
from contrastive_cli.starting import Starting, read_state, starting_weights
from tests.conftest import TINY, one_error_line, read_results, run_cli


def starting(path, strict=True):
    return Starting(str(path), None, read_state(path), strict)


def test_a_torchvision_checkpoint_with_its_classifier_gives_torchvisions_features(tmp_path):
    torch.manual_seed(1)
    tv = torchvision.models.resnet18(weights=None).eval()
    path = tmp_path / "resnet18.pth"
    torch.save(tv.state_dict(), path)  # fc.weight/fc.bias included, no net. prefix
    ours = starting(path).load_into(ResNet18(3, 64, stem="imagenet")).eval()
    tv.fc = torch.nn.Identity()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(ours(x), tv(x))


def test_a_training_checkpoint_and_a_wrapper_prefix_are_unwrapped(tmp_path):
    torch.manual_seed(2)
    source = ConvNet(1, 8, widths=(4, 8), strides=(2, 2))
    path = tmp_path / "ckpt.pt"
    wrapped = {f"module.{k}": v for k, v in source.state_dict().items()}
    torch.save({"epoch": 3, "state_dict": wrapped}, path)
    loaded = starting(path).load_into(ConvNet(1, 8, widths=(4, 8), strides=(2, 2)))
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in source.state_dict().items())


def test_a_mismatch_is_one_line_unless_not_strict(tmp_path, caplog):
    torch.manual_seed(3)
    path = tmp_path / "other.safetensors"
    save_file(ConvNet(1, 8, widths=(4, 16), strides=(2, 2)).state_dict(), str(path))
    target = ConvNet(1, 8, widths=(4, 8, 8), strides=(2, 2, 2))
    with pytest.raises(ConfigError) as e:
        starting(path).load_into(target)
    message = str(e.value)
    assert "\n" not in message and "encoder.strict=false" in message
    assert "5 missing (net.6.weight" in message  # the third block: conv + BN (4 entries + count)
    assert "of another shape (net.3.weight" in message and "file (16, 4, 3, 3)" in message
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with caplog.at_level(logging.INFO):
        starting(path, strict=False).load_into(target)
    after = target.state_dict()
    assert torch.equal(after["net.0.weight"], load_file(str(path))["net.0.weight"])  # matched
    assert torch.equal(after["net.3.weight"], before["net.3.weight"])  # skipped: kept as built
    assert "skipped (encoder.strict=false)" in caplog.text


def test_a_pickle_with_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"weight": torch.zeros(1), "hook": ConvNet}, path)  # a class: not plain data
    with pytest.raises(ConfigError, match="holds objects other than tensors"):
        read_state(path)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("missing.safetensors", "no such file"),
        ("weights.txt", "allowed: a .safetensors, .pt, .pth or .bin file"),
        (".", "a folder without encoder.safetensors"),
    ],
)
def test_files_that_are_not_weights_are_one_line(compose_cfg, tmp_path, value, message):
    (tmp_path / "weights.txt").write_text("x")
    cfg = compose_cfg(f"encoder.weights={tmp_path / value}")
    with pytest.raises(ConfigError, match=message) as e:
        starting_weights(cfg, ConvNet(1, 8))
    assert "\n" not in str(e.value)


def test_a_mismatched_file_is_one_line_and_leaves_no_run_directory(tmp_path):
    path = tmp_path / "mismatch.safetensors"
    save_file(ConvNet(1, 8, widths=(4,), strides=(2,)).state_dict(), str(path))
    proc = run_cli(["train", f"encoder.weights={path}", *TINY], cwd=tmp_path)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "does not fit the encoder: " in lines[0] and " missing (net." in lines[0]
    assert not (tmp_path / "outputs").exists()


@pytest.fixture(scope="module")
def continued(tmp_path_factory):
    """Run A (1 epoch), then run B continuing from a copy of A's encoder.safetensors."""
    root = tmp_path_factory.mktemp("starting")
    args = [*TINY, "trainer.epochs=1", "eval.plots=false"]
    run_cli(["train", *args, f"hydra.run.dir={root / 'a'}"], cwd=root, check=True)
    weights = root / "start.safetensors"
    shutil.copy(root / "a" / "encoder.safetensors", weights)
    run_cli(
        ["train", *args, f"encoder.weights={weights}", f"hydra.run.dir={root / 'b'}"],
        cwd=root,
        check=True,
    )
    return root, weights


def test_the_pretrained_baseline_is_the_loaded_encoder_and_the_sha_is_recorded(continued):
    root, weights = continued
    a, b = read_results(root / "a"), read_results(root / "b")
    assert b["baselines"]["pretrained"]["knn_k200"] == a["metrics"]["knn_k200"]
    assert b["baselines"]["pretrained"]["linear_top1"] == a["metrics"]["linear_top1"]
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert b["starting_weights"] == {"source": str(weights), "sha256": sha, "strict": True}
    table = results_table(b)
    assert "pretrained (as loaded)" in table and "gain over best baseline" in table
    state = load_checkpoint(root / "b" / "checkpoints" / "last.pt")
    assert state["starting_weights"]["sha256"] == sha  # what resume compares


def test_reproduce_and_resume_refuse_a_changed_or_missing_file(continued, tmp_path, capsys):
    root, weights = continued
    original = weights.read_bytes()
    b = tmp_path / "b"
    shutil.copytree(root / "b", b, ignore=shutil.ignore_patterns(".lock"))
    results = json.loads((b / "results.json").read_text())
    try:
        tensors = load_file(str(weights))
        save_file({k: v + 1 for k, v in tensors.items()}, str(weights))
        line = one_error_line(capsys, cli.main(["reproduce", str(b), "--out", str(tmp_path / "r")]))
        assert "changed since it started" in line
        weights.unlink()
        line = one_error_line(capsys, cli.main(["reproduce", str(b), "--out", str(tmp_path / "r")]))
        assert "are missing" in line
        (b / "results.json").write_text(json.dumps({**results, "status": "interrupted"}))
        line = one_error_line(capsys, cli.main(["resume", str(b)]))
        assert line.startswith("error: contrast resume: the run's starting weights")
        assert not (tmp_path / "r").exists()
    finally:
        weights.write_bytes(original)


def test_starting_weights_reads_the_config(compose_cfg, tmp_path):
    assert starting_weights(compose_cfg(), ConvNet(1, 8)) is None
    path = tmp_path / "w.safetensors"
    save_file(ConvNet(1, 8).state_dict(), str(path))
    cfg = compose_cfg(f"encoder.weights={tmp_path}/w.safetensors")
    found = starting_weights(cfg, ConvNet(1, 8))
    assert found is not None and found.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_timm_resnet18_file_gives_timms_features_before_any_step(compose_cfg, tmp_path):
    import timm

    from contrastive_cli.builder import build_run

    torch.manual_seed(5)
    timms = timm.create_model("resnet18", num_classes=10, in_chans=1).eval()
    path = tmp_path / "resnet18.safetensors"
    save_file(timms.state_dict(), str(path))  # with its 10-class classifier
    cfg = compose_cfg("encoder=timm", "encoder.name=resnet18", f"encoder.weights={path}")
    encoder = build_run(cfg).training.method.encoder.eval()
    timms.reset_classifier(0)
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(encoder(x), timms(x))


def test_pretrained_offline_names_the_file_and_leaves_no_run_directory(tmp_path):
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path)}
    proc = run_cli(["train", "encoder=timm", "encoder.pretrained=true", *TINY], tmp_path, env)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert "huggingface.co/timm/resnet18" in lines[0] and "encoder.weights=PATH" in lines[0]
    assert not (tmp_path / "outputs").exists()


def test_pretrained_needs_a_timm_encoder(compose_cfg):
    with pytest.raises(ConfigError, match="only timm encoders"):
        starting_weights(compose_cfg("encoder.pretrained=true"), ConvNet(1, 8))


def test_runs_from_before_the_starting_keys_keep_their_training_digest(compose_cfg):
    from omegaconf import OmegaConf

    from contrastive_cli.record import training_digest

    now = OmegaConf.to_container(compose_cfg(), resolve=True)
    before = {
        **now,
        "encoder": {
            k: v for k, v in now["encoder"].items() if k not in ("weights", "strict", "pretrained")
        },
    }
    assert training_digest(before) == training_digest(now)  # an older checkpoint resumes
    started = OmegaConf.to_container(compose_cfg("encoder.weights=w.pt"), resolve=True)
    assert training_digest(started) != training_digest(now)

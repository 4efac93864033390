"""Every shipped encoder trains with a method of each kind, and timm's models build as asked.

The matrix builds each run as `contrast train` does (config validated, digits at 8 px, real
batches and augmentation) and takes 2 optimizer steps on the CPU: the loss is finite and
every encoder weight that had a gradient moved.
"""

from __future__ import annotations

import pytest
import timm
import torch

from contrastive_cli.builder import build_run, train_steps
from contrastive_cli.config import build, compose
from contrastive_cli.errors import ConfigError
from contrastive_cli.models.timm_encoder import TimmEncoder, auto_patch
from contrastive_cli.parts import encoder_node
from contrastive_cli.validate import validate
from tests.conftest import TINY

ENCODERS = {
    "cnn": ["encoder=cnn"],
    "mlp": ["encoder=mlp"],
    "resnet18": ["encoder=resnet18"],
    "resnet50": ["encoder=resnet50"],
    "vit_tiny": ["encoder=vit_tiny"],
    "vit_small": ["encoder=vit_small"],
    "convnext_tiny": ["encoder=convnext_tiny"],
    "timm": [
        "encoder=timm",
        "encoder.name=test_vit",
        "encoder.patch_size=auto",
    ],  # a tiny timm model
}
METHODS = {  # one of each kind
    "contrastive": ["loss=ntxent"],
    "distillation": ["loss=byol"],
    "redundancy": ["loss=barlow"],
}
SMALL = [*TINY, "device=cpu", "trainer.batch_size=8", "eval.every=0"]


def two_steps(overrides: list[str]) -> tuple[list[float], dict, dict]:
    """(the 2 step losses, encoder weights before, after) of a run built from ``overrides``."""
    cfg = compose([*SMALL, *overrides])
    validate(cfg)
    built = build_run(cfg)
    encoder = built.training.method.encoder
    before = {n: p.detach().clone() for n, p in encoder.named_parameters()}
    progress = train_steps(built, 2, cfg.trainer.epochs, cfg.trainer.seed)
    after = {n: p.detach().clone() for n, p in encoder.named_parameters()}
    return progress.step_losses, before, after


CHEAP = ("cnn", "mlp", "timm")  # every method with these in `make test`
DIAGONAL = {  # and one method each for the large ones (the rest of the matrix: make test-all)
    "resnet18": "redundancy",
    "resnet50": "contrastive",
    "vit_tiny": "distillation",
    "vit_small": "redundancy",
    "convnext_tiny": "distillation",
}
MATRIX = [
    pytest.param(
        e,
        m,
        marks=() if e in CHEAP or DIAGONAL.get(e) == m else pytest.mark.slow,
        id=f"{e}-{m}",
    )
    for e in ENCODERS
    for m in METHODS
]


@pytest.mark.parametrize(("encoder", "method"), MATRIX)
def test_every_encoder_trains_with_every_kind_of_method(encoder, method):
    losses, before, after = two_steps([*ENCODERS[encoder], *METHODS[method]])
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    moved = [n for n in before if not torch.equal(before[n], after[n])]
    assert len(moved) >= len(before) // 2, (encoder, method, len(moved), len(before))


def test_dino_multi_crop_with_a_vit_at_two_resolutions():
    """Two global 8 px views and two local crops of 6 px (not a whole number of 4 px patches:
    padded to 8, position embeddings interpolated to the grid) train the ViT student."""
    losses, before, after = two_steps(
        [
            "encoder=vit_tiny",
            "loss=dino",
            "data.augment.local_crops=2",
            "data.augment.local_crop_size=6",
        ]
    )
    assert all(torch.isfinite(torch.tensor(losses)))
    assert not torch.equal(before["model.pos_embed"], after["model.pos_embed"])


def test_vit_features_at_another_size_use_interpolated_position_embeddings():
    torch.manual_seed(0)
    net = TimmEncoder(1, 16, "vit_tiny_patch16_224", patch_size="auto").eval()
    assert net.patch == 4 and net.model.patch_embed.grid_size == (4, 4)
    x = torch.randn(2, 1, 12, 12)
    got = net(x)
    # by hand: timm's pieces with the position embeddings resampled to a 3x3 grid
    from timm.layers import resample_abs_pos_embed

    m = net.model
    tokens = m.patch_embed(x)  # (B, 3, 3, D) with dynamic_img_size
    pos = resample_abs_pos_embed(m.pos_embed, (3, 3), num_prefix_tokens=1)
    seq = torch.cat([m.cls_token.expand(2, -1, -1), tokens.flatten(1, 2)], 1) + pos
    want = m.norm(m.blocks(seq))[:, 0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("size", "patch"), [(8, 4), (28, 4), (32, 4), (64, 8), (96, 8), (224, 16)])
def test_the_auto_patch_gives_a_sensible_token_grid(size, patch):
    assert auto_patch(size) == patch


def test_a_timm_model_is_timms_model_without_its_classifier():
    """Same seed, same weights: our encoder's features are timm's pooled features."""
    torch.manual_seed(0)
    ours = TimmEncoder(3, 32, "resnet18")
    torch.manual_seed(0)
    theirs = timm.create_model("resnet18", num_classes=0)
    x = torch.randn(2, 3, 32, 32)
    assert ours.out_dim == 512 and ours.timm_name == "resnet18"
    torch.testing.assert_close(ours.eval()(x), theirs.eval()(x))


def test_kwargs_channels_and_the_image_size_reach_timm():
    net = TimmEncoder(1, 16, "test_vit", kwargs={"drop_path_rate": 0.1})
    assert net.model.patch_embed.proj.in_channels == 1
    assert net.model.patch_embed.img_size == (16, 16)
    assert net.model.blocks[-1].drop_path1.drop_prob == pytest.approx(0.1)


@pytest.mark.parametrize(
    ("name", "size", "stem_conv", "stride"),
    [
        ("resnet50", 32, "conv1", 1),
        ("resnet50", 128, "conv1", 2),
        ("convnext_tiny", 28, "stem.0", 2),
    ],
)
def test_small_images_get_a_small_stem(name, size, stem_conv, stride):
    cfg = compose([f"encoder={name}"])
    net = build(encoder_node(cfg), in_channels=3, image_size=size)
    conv = net.model.get_submodule(stem_conv)
    assert conv.stride == (stride, stride)
    if name == "resnet50":
        assert isinstance(net.model.maxpool, torch.nn.Identity) == (size < 96)


def test_grad_checkpointing_gives_the_same_gradients():
    x = torch.randn(2, 1, 8, 8)
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        net = TimmEncoder(1, 8, "test_vit", patch_size=4, grad_checkpointing=checkpointing)
        net(x).square().sum().backward()
        grads.append(net.model.patch_embed.proj.weight.grad)
    assert net.model.grad_checkpointing
    torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"name": "resnet_18"}, "timm has no such model (did you mean resnet18"),
        ({"name": "resnet18", "kwargs": {"bogus": 1}}, "encoder.kwargs.bogus=1 is not allowed"),
        ({"name": "test_vit", "patch_size": 3}, "a multiple of 3"),
        ({"name": "test_efficientnet", "stem": "small"}, "encoder.stem=small is not allowed"),
    ],
)
def test_bad_timm_settings_are_config_errors(kwargs, words):
    with pytest.raises(ConfigError, match=r"^encoder|^data") as e:
        TimmEncoder(1, 8, **kwargs)
    assert words in str(e.value) and "\n" not in str(e.value)


# --------------------------------------------------------------------------- two processes
MULTI = {
    "vit_tiny": [
        "encoder=vit_tiny",
        "+encoder.kwargs.depth=2",
        "loss=byol",
        "trainer.batch_size=16",
    ],
    "resnet50": pytest.param(
        ["encoder=resnet50", "loss=ntxent", "trainer.batch_size=16"], marks=pytest.mark.slow
    ),
}


@pytest.mark.parametrize("overrides", list(MULTI.values()), ids=list(MULTI))
def test_two_processes_train_a_large_encoder_as_one_does(tmp_path, overrides):
    """3 real steps (digits, global batch 16, SGD, deterministic kernels) on two gloo
    processes give the one-process weights, buffers and losses, to float32 summation order
    (the tolerances of tests/test_distributed.py)."""
    from tests.test_distributed import WORLD, _three_steps, in_processes

    ranks = in_processes(_three_steps, tmp_path, overrides, WORLD)
    one = _three_steps(0, overrides, 1)
    for got in ranks:
        assert got["step"] == one["step"] == 3
        torch.testing.assert_close(
            torch.tensor(got["losses"]), torch.tensor(one["losses"]), rtol=1e-5, atol=1e-6
        )
        for name, value in one["method"].items():
            torch.testing.assert_close(got["method"][name], value, rtol=1e-5, atol=1e-6, msg=name)


# --------------------------------------------------------------------------- the command line
@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["encoder=timm", "encoder.name=resnet_18"], "did you mean resnet18"),
        (["encoder=vit_tiny", "encoder.patch_size=3"], "data.image_size=8 is not allowed"),
        (["encoder=timm", "encoder.kwargs.drop_rate=0.1"], "+encoder.kwargs.drop_rate=0.1"),
        (["encoder=timm", "encoder.name=test_vit", "encoder.grad_checkpointing=true"], "patch"),
    ],
)
def test_bad_encoder_settings_are_one_line_and_leave_no_run_directory(
    tmp_path, capsys, monkeypatch, args, words
):
    from contrastive_cli import cli
    from tests.conftest import one_error_line, run_dirs

    monkeypatch.chdir(tmp_path)
    line = one_error_line(capsys, cli.main(["train", "data=digits", *args]))
    assert words in line
    assert run_dirs(tmp_path) == [] and not (tmp_path / "outputs").exists()


@pytest.mark.slow  # a whole run with evaluation (the matrix above covers training in make test)
def test_a_timm_vit_with_dino_multi_crop_runs_end_to_end_and_is_evaluated(tmp_path):
    """`contrast train` with a timm ViT, DINO and local crops: trained, evaluated (k-NN and
    probe on its pooled features), the random-init baseline built from the same family."""
    from tests.conftest import read_results, run_cli, run_dirs

    args = [
        "train",
        *TINY,
        "trainer.epochs=1",
        "encoder=timm",
        "encoder.name=test_vit",
        "encoder.patch_size=auto",
        "loss=dino",
        "data.augment.local_crops=2",
        "eval.plots=false",
    ]
    run_cli(args, cwd=tmp_path, check=True)
    (run,) = run_dirs(tmp_path)
    results = read_results(run)
    assert results["status"] == "completed"
    for metrics in (results["metrics"], results["baselines"]["random_init"]):
        assert 0.1 < metrics["knn_k200"] <= 1 and 0.1 < metrics["linear_top1"] <= 1

"""Every option of every config group composes with the real configs and instantiates."""

from __future__ import annotations

import itertools

import pytest
import torch
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf

from contrastive_cli.config import build, config_groups
from contrastive_cli.device import Runtime
from contrastive_cli.errors import ConfigError
from contrastive_cli.parts import encoder_node
from tests.fakes import write_cifar, write_mnist

GROUPS = {
    "data": ["cifar10", "cifar100", "digits", "fashion_mnist", "folder", "mnist", "stl10"],
    "data/augment": ["color", "color_blur", "digits", "gray", "gray_upright"],
    "device": ["auto", "cpu", "cuda", "mps"],
    "encoder": [
        "cnn",
        "convnext_tiny",
        "mlp",
        "resnet18",
        "resnet50",
        "timm",
        "vit_small",
        "vit_tiny",
    ],
    # Discovered: a new method is its YAML, loss module and method module; nothing here.
    "loss": config_groups()["loss"],
    "optim": ["adam", "lars", "sgd"],
    "tracker": ["mlflow", "tensorboard"],  # none by default; several at once: tracker=[a,b]
    # Overlays on top of the defaults (+experiment=NAME): measured recipes, one per dataset.
    "experiment": ["cifar10_cpu", "cifar10_gpu", "digits", "fashion_mnist_15min"],
}
OPTIONS = [(g, option) for g, options in GROUPS.items() if g != "experiment" for option in options]
SHAPES = {
    "digits": (1, 8),
    "mnist": (1, 28),
    "fashion_mnist": (1, 28),
    "cifar10": (3, 32),
    "cifar100": (3, 32),
}
CLASSES = {"digits": 10, "mnist": 10, "fashion_mnist": 10, "cifar10": 10, "cifar100": 100}


def test_the_config_groups_and_their_options():
    assert config_groups() == {g: o for g, o in GROUPS.items() if g != "experiment"}
    assert config_groups(overlays=True) == GROUPS


@pytest.mark.parametrize("group,option", OPTIONS)
def test_every_option_composes(compose_cfg, group, option):
    cfg = compose_cfg(f"{group}={option}")
    node = OmegaConf.select(cfg, group.replace("/", "."))
    targets = {
        "data": lambda: [node.source._target_, node.augment._target_],
        "optim": lambda: [node.optimizer._target_, node.scheduler._target_],
        "tracker": lambda: [node[option]._target_],  # tracker.mlflow: a list may hold several
    }.get(group, lambda: [node._target_])()
    assert all(targets)
    defaults = {g for g in GROUPS if g not in ("tracker", "experiment") and "/" not in g}
    top = group.split("/")[0]
    assert set(cfg) == {*defaults, top, "trainer", "eval", "debug"}  # no group added or lost


@pytest.mark.parametrize("experiment", GROUPS["experiment"])
def test_every_experiment_overlays_the_defaults_and_validates(compose_cfg, experiment):
    """+experiment=NAME composes, passes validation and builds its parts; its YAML says what
    it measured (or that it is unmeasured) so the numbers travel with the recipe."""
    from pathlib import Path

    from contrastive_cli.validate import validate

    cfg = compose_cfg(f"+experiment={experiment}")
    if cfg.device.type == "cuda" and not torch.cuda.is_available():
        cfg.device.type = "cpu"  # the rest of a GPU recipe is still checked here
    validate(cfg)
    assert cfg.data.name in experiment or experiment.startswith(cfg.data.name)
    text = (Path(__file__).parents[1] / "conf" / "experiment" / f"{experiment}.yaml").read_text()
    assert "measured" in text.lower()
    build(cfg.optim.optimizer, params=[torch.nn.Parameter(torch.zeros(2))])


def test_several_trackers_at_once(compose_cfg):
    cfg = compose_cfg("tracker=[mlflow,tensorboard]")
    assert list(cfg.tracker) == ["mlflow", "tensorboard"]
    assert "tracker" not in compose_cfg("tracker=[]")


def test_selecting_an_option_that_does_not_exist_lists_the_valid_ones(compose_cfg):
    for group, options in GROUPS.items():
        with pytest.raises(MissingConfigException) as e:
            compose_cfg(f"{'+' if group == 'experiment' else ''}{group}=nonexistent")
        message = str(e.value)
        assert f"{group}/nonexistent" in message and "Available options" in message
        assert all(option in message for option in options)


def test_a_misspelt_key_is_an_error_not_a_new_key(compose_cfg):
    with pytest.raises(ConfigCompositionException, match=r"trainer\.epoch"):
        compose_cfg("trainer.epoch=3")


# --------------------------------------------------------------------------- data
@pytest.mark.parametrize(
    "data", list(SHAPES)
)  # built-in sets; folder/stl10: tests/test_folder.py, test_stl10.py
def test_data_options_declare_their_shape_and_build_their_augmentation(compose_cfg, data):
    cfg = compose_cfg(f"data={data}").data
    c, size = SHAPES[data]
    assert (cfg.channels, cfg.image_size, cfg.num_classes, cfg.name) == (
        c,
        size,
        CLASSES[data],
        data,
    )
    assert len(cfg.mean) == len(cfg.std) == c
    augment = build(cfg.augment)
    x = torch.randint(0, 256, (4, c, size, size), dtype=torch.uint8)
    assert augment(x, torch.Generator().manual_seed(0)).shape == (4, c, size, size)
    if c == 1:  # digits and clothes: no hue shifts
        assert cfg.augment.hue == 0 and cfg.augment.saturation == 0
    if data in ("digits", "mnist"):  # digits are not mirror-symmetric
        assert cfg.augment.hflip == 0


@pytest.mark.parametrize("data", list(SHAPES))  # folder/stl10: tests/test_folder.py, test_stl10.py
def test_data_sources_load_tiny_files_offline(compose_cfg, tmp_path, data):
    """Each source, as configured, reads files in the original layout from data.root."""
    c, size = SHAPES[data]
    overrides = [f"data={data}"]
    if data != "digits":
        overrides += [f"data.root={tmp_path}", "data.download=false"]
    if data in ("mnist", "fashion_mnist"):
        folder = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}[data]
        write_mnist(tmp_path / folder / "raw", gz=True)
    elif data == "cifar10":
        write_cifar(
            tmp_path / "cifar-10-batches-py",
            [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"],
        )
    elif data == "cifar100":
        write_cifar(tmp_path / "cifar-100-python", ["train", "test"], "fine_labels", 100)
    cfg = compose_cfg(*overrides)
    loaded = build(cfg.data.source)
    assert loaded.train.images.shape[1:] == (c, size, size) and loaded.num_classes == CLASSES[data]
    assert loaded.labelled


# --------------------------------------------------------------------------- encoder
@pytest.mark.parametrize("encoder", GROUPS["encoder"])
@pytest.mark.parametrize("data", ["digits", "mnist", "cifar10"])
def test_every_encoder_on_every_data_shape(compose_cfg, encoder, data):
    cfg = compose_cfg(f"encoder={encoder}", f"data={data}")
    c, size = SHAPES[data]
    torch.manual_seed(0)
    net = build(encoder_node(cfg), in_channels=cfg.data.channels, image_size=cfg.data.image_size)
    out = net(torch.randn(2, c, size, size))
    assert out.shape == (2, net.out_dim) and torch.isfinite(out).all()


# --------------------------------------------------------------------------- loss
@pytest.mark.parametrize("loss", GROUPS["loss"])
def test_every_loss_builds_its_method_around_an_encoder(compose_cfg, loss):
    cfg = compose_cfg(f"loss={loss}", "encoder=mlp")
    torch.manual_seed(0)
    encoder = build(encoder_node(cfg), in_channels=1, image_size=8)
    method = build(cfg.loss, encoder=encoder)
    assert method.encoder is encoder
    views = torch.randn(2, 8, 1, 8, 8)
    value = method([views[0], views[1]], torch.arange(8) % 4)
    assert value.dim() == 0 and torch.isfinite(value)
    value.backward()
    method.after_step(1, 10)


def test_loss_defaults_are_the_papers(compose_cfg):
    """SimCLR T=0.5 (CIFAR); MoCo v2 T=0.2, momentum 0.99 and queue 4096 (CIFAR demo);
    BYOL tau_base=0.996 and 256-d projections; FaceNet margin 0.2 with semi-hard mining."""
    loss = lambda name: compose_cfg(f"loss={name}").loss  # noqa: E731
    assert loss("ntxent").temperature == 0.5
    moco = loss("moco")
    assert (moco.temperature, moco.momentum, moco.queue_size) == (0.2, 0.99, 4096)
    assert moco.out_dim == moco.projector.out_dim
    byol = loss("byol")
    assert (byol.base_momentum, byol.projector.out_dim, byol.predictor.out_dim) == (0.996, 256, 256)
    triplet = loss("triplet")
    assert (triplet.margin, triplet.mining, triplet.positives) == (0.2, "semihard", "views")


def test_the_new_methods_defaults(compose_cfg):
    """SimSiam: 3-layer projector with output BN, bottleneck predictor (width / 4); Barlow
    lambda 0.0051; VICReg 25/25/1; SupCon T=0.1; DINO tau 0.996, centre 0.9, student 0.1,
    teacher 0.04 -> 0.07, weight-normalised prototypes of norm 1; Hadsell margin 1, views."""
    loss = lambda name: compose_cfg(f"loss={name}").loss  # noqa: E731
    simsiam = loss("simsiam")
    assert (simsiam.projector.layers, simsiam.projector.output_batch_norm) == (3, True)
    assert simsiam.predictor.hidden_dim * 4 == simsiam.predictor.out_dim
    assert simsiam.projection_dim == simsiam.projector.out_dim == simsiam.predictor.out_dim
    barlow = loss("barlow")
    assert (barlow.lambda_offdiag, barlow.projector.layers) == (0.0051, 3)
    assert not barlow.projector.get("output_batch_norm", False)
    vicreg = loss("vicreg")
    assert (vicreg.sim_coeff, vicreg.std_coeff, vicreg.cov_coeff, vicreg.expander.layers) == (
        25.0,
        25.0,
        1.0,
        3,
    )
    assert loss("supcon").temperature == 0.1
    dino = loss("dino")
    assert (dino.base_momentum, dino.center_momentum, dino.student_temp) == (0.996, 0.9, 0.1)
    assert (dino.teacher_temp_start, dino.teacher_temp_end) == (0.04, 0.07)
    assert (dino.head.layers, dino.head.batch_norm, dino.head.norm_last_layer) == (3, False, True)
    contrastive = loss("contrastive")
    assert (contrastive.margin, contrastive.distance, contrastive.positives) == (
        1.0,
        "euclidean",
        "views",
    )


def test_swav_nnclr_and_mocov3_defaults(compose_cfg):
    """SwAV: T=0.1, eps 0.05, 3 Sinkhorn iterations, 3000 prototypes, queue 3840 from epoch
    15, prototypes frozen for 1 epoch, its epochs those of the run; NNCLR: T=0.1, a 256-d
    support set; MoCo v3: T=0.2, momentum 0.99 -> 1, 256-d keys."""
    loss = lambda *o: compose_cfg(*o).loss  # noqa: E731
    swav = loss("loss=swav", "trainer.epochs=7")
    assert (swav.temperature, swav.epsilon, swav.sinkhorn_iterations, swav.prototypes) == (
        0.1,
        0.05,
        3,
        3000,
    )
    assert (swav.queue_size, swav.queue_start_epoch, swav.freeze_prototypes_epochs) == (3840, 15, 1)
    assert swav.epochs == 7 and swav.projection_dim == swav.projector.out_dim
    nnclr = loss("loss=nnclr")
    assert (nnclr.temperature, nnclr.projection_dim, nnclr.predictor.out_dim) == (0.1, 256, 256)
    mocov3 = loss("loss=mocov3")
    assert (mocov3.temperature, mocov3.base_momentum, mocov3.projection_dim) == (0.2, 0.99, 256)


@pytest.mark.parametrize("local_crops", [0, 2])
def test_swav_builds_and_steps_with_local_crops(compose_cfg, local_crops):
    cfg = compose_cfg("loss=swav", "encoder=mlp", f"data.augment.local_crops={local_crops}")
    torch.manual_seed(0)
    method = build(cfg.loss, encoder=build(encoder_node(cfg), in_channels=1, image_size=8))
    views = [torch.randn(8, 1, 8, 8) for _ in range(2)] + [
        torch.randn(8, 1, 8, 8) for _ in range(local_crops)
    ]
    value = method(views)
    assert value.dim() == 0 and torch.isfinite(value)


@pytest.mark.parametrize("override", ["loss.positives=labels", "loss.distance=cosine"])
def test_contrastive_options_build(compose_cfg, override):
    cfg = compose_cfg("loss=contrastive", "encoder=mlp", override)
    method = build(cfg.loss, encoder=build(encoder_node(cfg), in_channels=1, image_size=8))
    assert method([torch.randn(8, 1, 8, 8)] * 2, torch.arange(8) % 2).dim() == 0


def test_dino_builds_with_local_crops_of_the_configured_size(compose_cfg):
    cfg = compose_cfg("loss=dino", "data.augment.local_crops=3", "data.augment.local_crop_size=4")
    encoder = build(encoder_node(cfg), in_channels=1, image_size=8)
    method, augment = build(cfg.loss, encoder=encoder), build(cfg.data.augment)
    images = torch.randint(0, 256, (6, 1, 8, 8), dtype=torch.uint8)
    views = augment.views(images, torch.Generator().manual_seed(0))
    assert [tuple(v.shape[-2:]) for v in views] == [(8, 8)] * 2 + [(4, 4)] * 3
    assert torch.isfinite(method(views, None))


@pytest.mark.parametrize(
    "override", ["loss.mining=hard", "loss.mining=all", "loss.positives=labels"]
)
def test_triplet_options_build(compose_cfg, override):
    cfg = compose_cfg("loss=triplet", "encoder=mlp", override)
    method = build(cfg.loss, encoder=build(encoder_node(cfg), in_channels=1, image_size=8))
    assert (
        method([torch.randn(8, 1, 8, 8), torch.randn(8, 1, 8, 8)], torch.arange(8) % 2).dim() == 0
    )


# --------------------------------------------------------------------------- optim
@pytest.mark.parametrize("optim", GROUPS["optim"])
def test_every_optim_builds_an_optimizer_and_a_warmup_cosine_schedule(compose_cfg, optim):
    cfg = compose_cfg(f"optim={optim}")
    params = [torch.nn.Parameter(torch.zeros(3))]
    optimizer = build(cfg.optim.optimizer)(params)
    scheduler = build(cfg.optim.scheduler)(optimizer, steps_per_epoch=4, epochs=3)
    base = cfg.optim.optimizer.lr
    lrs = []
    for _ in range(12):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[:4] == pytest.approx([base / 4, base / 2, 3 * base / 4, base])  # one warmup epoch
    assert all(a >= b for a, b in itertools.pairwise(lrs[3:]))  # then decays
    assert lrs[-1] < base * 0.1


@pytest.mark.parametrize("optim", GROUPS["optim"])
def test_optim_lr_is_the_optimizers_learning_rate(compose_cfg, optim):
    cfg = compose_cfg(f"optim={optim}", "optim.lr=0.005")
    optimizer = build(cfg.optim.optimizer)([torch.nn.Parameter(torch.zeros(3))])
    assert optimizer.defaults["lr"] == 0.005
    # The longer key still wins when it is the one set.
    cfg = compose_cfg(f"optim={optim}", "optim.optimizer.lr=0.002")
    assert build(cfg.optim.optimizer)([torch.nn.Parameter(torch.zeros(3))]).defaults["lr"] == 0.002


# --------------------------------------------------------------------------- device
def test_device_cpu_and_auto_resolve_here(compose_cfg):
    cpu = build(compose_cfg("device=cpu").device)
    assert isinstance(cpu, Runtime) and cpu.device == torch.device("cpu")
    assert not cpu.autocast and not cpu.channels_last  # fp32, NCHW on the CPU
    auto = build(compose_cfg("device=auto").device)
    expected = (
        "cuda"
        if torch.cuda.is_available()
        else "mps"
        if torch.backends.mps.is_available()
        else "cpu"
    )
    assert auto.device.type == expected
    native_cuda = expected == "cuda" and torch.cuda.get_device_capability() >= (8, 0)
    assert auto.autocast == native_cuda  # precision=auto: bf16 on CUDA only


@pytest.mark.parametrize("device", ["cuda", "mps"])
def test_an_unavailable_device_is_a_config_error(compose_cfg, device):
    available = torch.cuda.is_available() if device == "cuda" else torch.backends.mps.is_available()
    if available:
        pytest.skip(f"{device} is available on this machine")
    with pytest.raises(ConfigError, match=f"device={device}"):
        build(compose_cfg(f"device={device}").device)

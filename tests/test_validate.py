"""Config validation: bad configs give one line naming the key, exit code 2, no traceback,
and no run directory; every shipped config option validates cleanly."""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from omegaconf import DictConfig, open_dict

from contrastive_cli import cli
from contrastive_cli.command_line import check_command_line
from contrastive_cli.config import compose, config_groups
from contrastive_cli.errors import ConfigError, ConfigErrors, UserError
from contrastive_cli.schema import is_plain, target_types
from contrastive_cli.validate import _expected, validate
from tests.conftest import REPO, run_cli, run_dirs

# (overrides, text the one error line must contain: the key, or key=value). BAD_CLI runs
# through the real CLI in a subprocess each; all of BAD also through cli.main in-process.
BAD_CLI = [
    (["trainer.epochs=0"], "trainer.epochs=0"),
    (["experiment=digits"], "allowed: +experiment=digits"),
    (["+experiment=nope"], "experiment=nope is not allowed: no such option"),
    (["trainer.epochs=abc"], "trainer.epochs='abc'"),
    (["trainer.batch_size=1"], "trainer.batch_size=1"),
    (["trainer.resume=maybe"], "trainer.resume='maybe'"),
    (["loss.temperature=0"], "loss.temperature=0"),
    (["loss=moco", "loss.queue_size=100"], "loss.queue_size=100"),
    (["loss=moco", "loss.symmetric=true", "loss.queue_size=300"], "loss.queue_size=300"),
    (["loss=moco", "loss.momentum=1.0"], "loss.momentum=1.0"),
    (["loss=byol", "loss.base_momentum=1.5"], "loss.base_momentum=1.5"),
    (["loss=triplet", "loss.margin=-0.1"], "loss.margin=-0.1"),
    (["loss=triplet", "loss.mining=hardest"], "loss.mining='hardest'"),
    (["loss=triplet", "loss.positives=classes"], "loss.positives='classes'"),
    (["loss=triplet", "loss.positives=labels", "trainer.batch_size=16"], "loss.positives=labels"),
    (["optim.optimizer.lr=0"], "optim.optimizer.lr=0"),
    (["optim.lr=0"], "optim.lr=0"),
    (
        ["optim.scheduler.warmup_epochs=500", "trainer.epochs=10"],
        "optim.scheduler.warmup_epochs=500",
    ),
    (
        ["optim=sgd", "optim.optimizer.momentum=0", "optim.optimizer.nesterov=true"],
        "optim.optimizer.nesterov",
    ),
    (["eval.knn_k=[0]"], "eval.knn_k=[0]"),
    (["eval.probe.val_fraction=1.0"], "eval.probe.val_fraction=1.0"),
    (["eval.every=-1"], "eval.every=-1"),
    (["device=cpu", "device.precision=fp16"], "device.precision='fp16'"),
    (["encoder=mlp", "data.channels=3"], "data.channels=3"),
    (["encoder.widths=[32,64]", "encoder.strides=[2]"], "encoder.strides=[2]"),
    (["encoder=resnet18", "encoder.stem=tiny"], "encoder.stem='tiny'"),
    (["~trainer.batch_size"], "trainer.batch_size is missing"),
    (["trainer.epoch=3"], "trainer.epoch"),
    (["loss=foo"], "loss=foo"),
    (["trainer.epochs=["], "trainer.epochs=["),
    (["loss.queue_size=10"], "loss.queue_size"),  # a MoCo key with loss=ntxent
    # a method that does not use local crops (every one but DINO's) refuses them
    (["data.augment.local_crops=2"], "data.augment.local_crops=2 is not allowed with loss=ntxent"),
]
if not torch.cuda.is_available():
    BAD_CLI.append((["device=cuda"], "device=cuda"))
BAD = [
    *BAD_CLI,
    (["trainer.log_every=0"], "trainer.log_every=0"),
    (["loss=supcon", "loss.temperature=0"], "loss.temperature=0"),
    (["loss=contrastive", "loss.distance=l1"], "loss.distance='l1'"),
    (["loss=contrastive", "loss.positives=classes"], "loss.positives='classes'"),
    (["loss=barlow", "loss.scale=0"], "loss.scale=0"),
    (["loss=vicreg", "loss.std_coeff=-1"], "loss.std_coeff=-1"),
    (["loss=simsiam", "loss.projector.layers=0"], "loss.projector.layers=0"),
    (["loss=dino", "loss.teacher_temp_warmup=1.5"], "loss.teacher_temp_warmup=1.5"),
    (["loss=dino", "loss.center_momentum=1"], "loss.center_momentum=1"),
    (["loss=byol", "data.augment.local_crops=6"], "data.augment.local_crops=6"),
    (["eval.knn_temperature=0"], "eval.knn_temperature=0"),
    (["eval.metrics=[knn,lidar]"], "eval.metrics=['knn', 'lidar'] is not allowed"),
    (["eval.metrics=[]"], "eval.metrics=[]"),
    (["optim.optimizer.weight_decay=-1"], "optim.optimizer.weight_decay=-1"),
    (["data.augment.hflip=1.5"], "data.augment.hflip=1.5"),
    (["debug=yes"], "debug='yes'"),
    (["trainer.epochs=2.5"], "trainer.epochs=2.5"),
    (["trainer.batch_size=-8"], "trainer.batch_size=-8"),
    (["trainer.seed=-1"], "trainer.seed=-1"),
    (["loss.temperature=inf"], "loss.temperature=inf"),
    (["loss=moco", "loss.temperature=-0.5"], "loss.temperature=-0.5"),
    (["optim.optimizer.lr=-1e-3"], "optim.optimizer.lr=-0.001"),
    (["eval.knn_k=[]"], "eval.knn_k=[]"),
    (["eval.knn_k=20"], "eval.knn_k=20"),
    (["eval.probe.weight_decays=[-1e-4]"], "eval.probe.weight_decays"),
    (
        ["encoder._target_=tests.faults.UnpaddedConvNet", "~encoder.strides"],
        "encoder._target_='tests.faults.UnpaddedConvNet' in the config is not allowed; allowed: ",
    ),
    (["encoder._target_=no.such.Encoder"], "encoder._target_='no.such.Encoder'"),
    (["data.augment.crop_scale=[0.9,0.2]"], "data.augment.crop_scale=[0.9,0.2]"),
    (["trainer=3"], "trainer=3"),
    (["trainer.epochs=${nope}"], "trainer.epochs=${nope}"),
    (["+trainer.foo=1"], "trainer.foo"),
    (["loss=ntxent,moco"], "add -m"),
    (["data=null"], "data=null"),
    (
        ["data.name=café"],
        "unquoted values must be ASCII; allowed: quote the value, data.name='café'",
    ),
    (["hydra.run.dir="], "hydra.run.dir='' is not allowed"),
    (["hydra.output_subdir=null"], "hydra.output_subdir=null is not allowed"),
    (["--config-name=nope"], "--config-name=nope is not allowed: no nope.yaml"),
    (["--config-name", "nope"], "--config-name=nope is not allowed"),
]


def _id(case: tuple[list[str], str]) -> str:
    return " ".join(case[0])


@pytest.fixture(scope="module")
def cli_results(tmp_path_factory):
    """Every bad config through the real CLI, a few subprocesses at a time."""

    # Folders made here, in this thread: pytest's mktemp is not meant for concurrent calls.
    cwds = [tmp_path_factory.mktemp("bad") for _ in BAD_CLI]

    def one(cwd, case: tuple[list[str], str]):
        return cwd, run_cli(["train", *case[0]], cwd=cwd, timeout=300)

    with ThreadPoolExecutor(max_workers=3) as pool:
        return dict(zip(map(_id, BAD_CLI), pool.map(one, cwds, BAD_CLI), strict=True))


@pytest.mark.parametrize("case", BAD_CLI, ids=_id)
def test_bad_config_is_one_line_exit_2_and_no_run_dir(cli_results, case):
    cwd, proc = cli_results[_id(case)]
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and case[1] in lines[0], lines[0]
    assert any(words in lines[0] for words in ("allowed", "add -m", "use device="))
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not (cwd / "outputs").exists(), (
        "validation must run before Hydra creates a run directory"
    )


@pytest.mark.parametrize("case", BAD, ids=_id)
def test_bad_config_in_process(case, capsys):
    assert cli.main(["train", *case[0]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and case[1] in err, err


def test_an_own_encoder_allowed_on_this_machine_is_validated_like_a_shipped_one(
    monkeypatch, capsys
):
    """CONTRAST_EXTRA_TARGETS is the extension point for one's own code; what it allows is
    then checked like a shipped encoder (here: it cannot take the digits' 8x8 images)."""
    monkeypatch.setenv("CONTRAST_EXTRA_TARGETS", "encoder=tests.faults.UnpaddedConvNet")
    args = ["train", "encoder._target_=tests.faults.UnpaddedConvNet", "~encoder.strides"]
    assert cli.main(args) == 2
    assert "cannot take 1x8x8 images" in capsys.readouterr().err


def test_unknown_option_lists_the_valid_options():
    with pytest.raises(ConfigError, match=", ".join(config_groups()["loss"])):
        check_command_line(["loss=nonexistent"])


def test_unknown_key_suggests_the_close_one():
    with pytest.raises(ConfigError, match=r"did you mean trainer\.epochs\?"):
        check_command_line(["trainer.epoch=3"])


def test_interpolated_value_names_its_source():
    with pytest.raises(ConfigError, match=r"trainer\.epochs=0 \(from \$\{trainer\.seed\}\)"):
        check_command_line(["trainer.epochs=${trainer.seed}"])


def test_a_key_added_with_plus_must_be_a_parameter_of_its_target():
    check_command_line(["+data.augment.blur_sigma=[0.1,1.0]"])  # Augment takes it
    with pytest.raises(ConfigError, match="takes no 'foo'"):
        check_command_line(["+loss.foo=1"])


def _job_config(*overrides: str) -> DictConfig:
    cfg = compose(list(overrides))
    with open_dict(cfg):
        cfg.pop("hydra", None)
    return cfg


def _available(device: str) -> bool:
    return {
        "cuda": torch.cuda.is_available(),
        "mps": hasattr(torch.backends, "mps") and torch.backends.mps.is_available(),
    }.get(device, True)


@pytest.mark.parametrize(
    "group,option", [(g, o) for g, opts in config_groups().items() for o in opts]
)
def test_every_shipped_option_validates(group, option):
    cfg = _job_config(f"{group}={option}")
    if group == "device" and not _available(option):
        with pytest.raises(ConfigError, match=f"device={option}"):
            validate(cfg)
    else:
        validate(cfg)


@pytest.mark.parametrize("loss", config_groups()["loss"])
@pytest.mark.parametrize("encoder", config_groups()["encoder"])
def test_every_loss_and_encoder_pair_validates(loss, encoder):
    validate(_job_config(f"loss={loss}", f"encoder={encoder}", "device=cpu"))


def _typed_leaves(cfg: DictConfig, node: DictConfig, prefix: str = ""):
    """(key, type) of every plain value in ``cfg``, the type found as validate finds it."""
    for key in node:
        full = f"{prefix}{key}"
        if full == "hydra":
            continue
        tp = _expected(cfg, node, prefix.rstrip("."), str(key))
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not is_plain(tp):
            yield from _typed_leaves(cfg, child, f"{full}.")
        else:
            yield full, tp


def test_every_key_of_every_option_has_a_type():
    """Each value a shipped option sets is checked against a real type (an annotation of the
    constructor it goes to, or a section schema), not waved through as Any."""
    for group, options in config_groups().items():
        for option in options:
            cfg = _job_config(f"{group}={option}")
            untyped = [k for k, tp in _typed_leaves(cfg, cfg) if not is_plain(tp)]
            assert not untyped, f"{group}={option}: no type for {untyped}"


def test_an_unknown_key_is_refused_with_the_nearest_one():
    with pytest.raises(ConfigError, match=r"contrast has no setting trainer\.log_everyy"):
        validate(_job_config("+trainer.log_everyy=5"))


def test_choices_come_from_the_code():
    import typing

    from contrastive_cli.device import DEVICES, PRECISIONS
    from contrastive_cli.losses.contrastive import DISTANCES
    from contrastive_cli.losses.triplet import MINING

    for target, key, expected in (
        ("contrastive_cli.device.resolve_device", "type", DEVICES),
        ("contrastive_cli.device.resolve_device", "precision", PRECISIONS),
        ("contrastive_cli.methods.triplet.Triplet", "mining", MINING),
        ("contrastive_cli.methods.contrastive.Contrastive", "distance", DISTANCES),
    ):
        assert typing.get_args(target_types(target)[key]) == expected, key


def test_local_crops_are_taken_by_a_method_that_declares_it_uses_them():
    validate(_job_config("loss=dino", "data.augment.local_crops=4", "device=cpu"))
    with pytest.raises(
        ConfigError, match=r"allowed: 0, or a loss that uses local crops \(loss=dino, swav\)"
    ):
        validate(_job_config("loss=simsiam", "data.augment.local_crops=4", "device=cpu"))


def test_a_method_that_trains_on_labels_refuses_unlabelled_data(compose_cfg):
    """SupCon declares ``needs_labels``; unlabelled data is one line naming loss=supcon."""
    import dataclasses

    from contrastive_cli.data.datasets import Split
    from contrastive_cli.data.sources import load_digits
    from contrastive_cli.validate import check_data

    data = load_digits()
    check_data(compose_cfg("loss=supcon"), data)
    unlabelled = dataclasses.replace(data, pretrain=Split(data.pretrain.images))
    with pytest.raises(ConfigError) as e:
        check_data(compose_cfg("loss=supcon"), unlabelled)
    assert str(e.value).startswith("loss=supcon is not allowed: data=digits has no labels")
    assert "supcon" not in str(e.value).split("allowed:")[1]  # only losses that need none
    for loss in ("ntxent", "byol", "dino", "contrastive"):
        check_data(compose_cfg(f"loss={loss}"), unlabelled)
    with pytest.raises(ConfigError, match=r"loss\.positives=labels is not allowed"):
        check_data(compose_cfg("loss=contrastive", "loss.positives=labels"), unlabelled)


def test_supcon_on_an_unlabelled_folder_is_one_line_exit_2(tmp_path):
    from tests.image_folders import write_images

    write_images(tmp_path / "photos", classes=None, per_class=10, corrupt=False)
    args = ["train", "loss=supcon", "data=folder", f"data.path={tmp_path / 'photos'}"]
    proc = run_cli([*args, "data.image_size=16", "trainer.batch_size=8"], cwd=tmp_path)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: loss=supcon is not allowed: data=folder has no labels")


def test_check_data_uses_the_loaded_sizes(compose_cfg):
    from contrastive_cli.data.sources import load_digits
    from contrastive_cli.validate import check_data

    data = load_digits()
    with pytest.raises(ConfigError, match=f"larger than the {len(data.pretrain)} training images"):
        check_data(compose_cfg("trainer.batch_size=4096"), data)
    check_data(compose_cfg("loss=triplet", "loss.positives=labels", "trainer.batch_size=20"), data)


def test_debug_shows_the_traceback(tmp_path):
    proc = run_cli(["train", "loss.temperature=0", "debug=true"], cwd=tmp_path, timeout=300)
    assert proc.returncode != 0
    assert "Traceback" in proc.stderr and "loss.temperature" in proc.stderr


def test_a_bad_job_in_a_sweep_does_not_stop_the_others(tmp_path):
    proc = run_cli(
        [
            "train",
            "-m",
            "trainer.batch_size=1,128",
            "trainer.epochs=1",
            "eval.every=0",
            "eval.baselines=false",
            "eval.probe.max_iter=5",
            "eval.probe.weight_decays=[1e-3]",
        ],
        cwd=tmp_path,
        timeout=600,
    )
    assert "Traceback" not in proc.stderr, proc.stderr  # the exit code says whether all jobs passed
    bad, good = run_dirs(tmp_path / "outputs" / "multirun")
    from tests.conftest import read_results

    assert read_results(bad)["status"] == "failed"
    assert "trainer.batch_size=1 is not allowed" in read_results(bad)["error"]
    assert read_results(good)["status"] == "completed"


def test_output_dir_that_cannot_be_created_is_one_line(tmp_path):
    (tmp_path / "a_file").write_text("")
    for args in (["hydra.run.dir=a_file/run"], ["-m", "hydra.sweep.dir=a_file/sweep"]):
        proc = run_cli(["train", *args], cwd=tmp_path, timeout=300)
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert proc.returncode == 1 and len(lines) == 1, proc.stderr
        assert (
            "cannot create the run directory" in lines[0] and "a_file is not a folder" in lines[0]
        )


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write into read-only folders")
def test_read_only_output_dir_is_one_line(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    with pytest.raises(UserError, match="is not writable"):
        check_command_line([f"hydra.run.dir={locked}/run"])


def test_every_problem_of_a_command_line_at_once_each_with_its_did_you_mean(tmp_path):
    """Two typos, an unknown option and a bad value: four lines, one per problem, each with
    the nearest known name; found before torch is imported (what keeps it near a second)."""
    code = (
        "import sys; from contrastive_cli.cli import main; rc = main(sys.argv[1:]); "
        "print('torch imported' if 'torch' in sys.modules else 'torch not imported'); "
        "sys.exit(rc)"
    )
    args = ["train", "trainer.epoch=2", "loss.temprature=0.1", "loss=ntxnet", "eval.every=-1"]
    proc = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 4, proc.stderr
    assert all(line.startswith("error: ") for line in lines)
    text = proc.stderr
    assert "trainer.epoch is not allowed" in text and "did you mean trainer.epochs?" in text
    assert "loss.temprature" in text and "did you mean loss.temperature?" in text
    assert "loss=ntxnet" in text and "did you mean loss=ntxent?" in text
    assert "eval.every=-1 is not allowed" in text
    assert "_target_" not in text and "--cfg" not in text  # the user's words, not Hydra's
    assert "torch not imported" in proc.stdout
    assert "Traceback" not in text and not (tmp_path / "outputs").exists()


@pytest.mark.parametrize(
    "flags,shown",
    [
        (["--epochs", "2"], "allowed: trainer.epochs=2"),
        (["--epochs=2"], "allowed: trainer.epochs=2"),
        (["--batch-size", "32"], "allowed: trainer.batch_size=32"),
        (["--loss", "moco"], "allowed: loss=moco"),
        (["--trainer.seed", "3"], "allowed: trainer.seed=3"),
        (["--experiment", "digits"], "allowed: +experiment=digits"),
    ],
)
def test_a_flag_gets_the_override_that_means_it(flags, shown, capsys):
    assert cli.main(["train", *flags]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"error: {' '.join(flags)} is not an option") and shown in line, line


def test_a_flag_and_a_typo_together():
    with pytest.raises(ConfigErrors) as e:
        check_command_line(["--epochs", "2", "trainer.bach_size=8"])
    assert len(e.value.problems) == 2
    assert "trainer.epochs=2" in e.value.problems[0]
    assert "did you mean trainer.batch_size?" in e.value.problems[1]


def test_a_bare_key_is_matched_to_its_section():
    with pytest.raises(ConfigError, match=r"did you mean trainer\.epochs\?"):
        check_command_line(["epochs=3"])

"""Property test: random run directories and weights files from a grammar of hostile
content (interpolations, resolvers, resolver names built by interpolation, ``_args_``,
``_partial_``, ``_target_``s, nested nodes, odd overrides and choices, metadata) never get
a callable outside the shipped allowlist imported or called, and nothing is written outside
the run directory. Hydra's ``_locate`` (what ``instantiate`` imports a target with) and
``importlib.import_module`` are instrumented for the whole command."""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from contrastive_cli import cli
from contrastive_cli.command_line import compose_with_hydra
from contrastive_cli.errors import UserError
from contrastive_cli.rundirs import load_run
from contrastive_cli.safety import allowed_targets
from contrastive_cli.validate import validate

# Where a resolver or override would create folders: unique to this test process.
CANARY = Path(tempfile.gettempdir()) / f"contrast-canary-{os.getpid()}"
PAYLOADS = ["evil_payload.boom", "builtins.exec", "os.system", "subprocess.run", "pickle.loads"]
FOREIGN_MODULES = ("evil_payload", "builtins", "os", "subprocess", "pickle")
OVERRIDES = ["loss=moco", "trainer.epochs=2", "eval.baselines=false"]
_BASE = compose_with_hydra(OVERRIDES)
BASE_CONFIG = OmegaConf.to_container(
    OmegaConf.masked_copy(_BASE, [k for k in _BASE if k != "hydra"]), resolve=True
)
BASE_CHOICES = OmegaConf.to_container(_BASE.hydra.runtime.choices, resolve=False)

# ---------------------------------------------------------------- the grammar
payload = st.sampled_from(PAYLOADS)
interpolation = st.one_of(
    st.sampled_from(["${hydra.x}", "${oc.env:HOME}", "${..root}", "${data.root}"]),
    st.builds(
        lambda n: "${oc." + n + ":{_target_: builtins.exec}}", st.sampled_from(["create", "decode"])
    ),
    st.builds(lambda n: "${oc.${" + n + "}:x}", st.sampled_from(["hydra.n", "data.root"])),
    st.builds(
        lambda p: "${unique_dir:" + p + "}",
        st.sampled_from([str(CANARY), f"../{CANARY.name}-out", "made"]),
    ),
)
target_node = st.builds(
    lambda t, args, partial: {
        "_target_": t,
        **({"_args_": args} if args is not None else {}),
        **({"_partial_": True} if partial else {}),
    },
    payload,
    st.one_of(st.none(), st.lists(st.one_of(interpolation, st.just("x")), max_size=2)),
    st.booleans(),
)
value = st.recursive(
    st.one_of(interpolation, target_node, st.sampled_from([0, -1, 1e308, "", None, "plain"])),
    lambda inner: st.one_of(
        st.lists(inner, max_size=2),
        st.dictionaries(st.sampled_from(["a", "_args_"]), inner, max_size=2),
    ),
    max_leaves=4,
)
key = st.sampled_from(
    [
        "device",
        "device.type",
        "encoder",
        "encoder._args_",
        "encoder._target_",
        "loss.gather",
        "loss.projector",
        "data.augment.mean",
        "data.root",
        "hydra",
        "hydra.x",
        "hydra.n",
        "trainer._partial_",
        "optim.optimizer._target_",
        "extra",
    ]
)
override = st.one_of(
    st.builds(lambda k, v: f"{k}={v}", key, interpolation),
    st.builds(
        lambda k, t: f"{k}={t}", st.sampled_from(["encoder._target_", "+encoder._args_"]), payload
    ),
    st.builds(lambda t: "device.type={_target_:" + t + "}", payload),
    st.sampled_from(
        [
            "loss=ntxent",
            "loss=evil",
            f"hydra.run.dir={CANARY}",
            "loss=moco,byol",
            "data.root=elsewhere",
            "+experiment=digits",
            "tracker=mlflow",
        ]
    ),
)
run_directory = st.fixed_dictionaries(
    {
        "config": st.lists(st.tuples(key, value), max_size=3),
        "overrides": st.lists(override, max_size=2),
        # config.yaml as contrast train would have saved it for those overrides (so only the
        # override checks stand between a payload and Hydra), or the base run's
        "recorded": st.booleans(),
        "choices": st.one_of(
            st.none(),
            st.dictionaries(
                st.sampled_from(["loss", "encoder"]),
                st.one_of(interpolation, st.sampled_from(["supcon", "moco", "cnn"])),
                max_size=2,
            ),
        ),
    }
)


def _put(node: dict, dotted: str, new) -> None:
    *parents, last = dotted.split(".")
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[last] = new


def _write(run: Path, spec: dict) -> None:
    config = json.loads(json.dumps(BASE_CONFIG))
    if spec["recorded"] and not any("${" in o for o in spec["overrides"]):  # resolving
        # their interpolations here would run them in the test itself
        with contextlib.suppress(Exception):  # overrides Hydra cannot compose: the base run's
            cfg = compose_with_hydra(OVERRIDES + spec["overrides"])
            cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
            config = OmegaConf.to_container(cfg, resolve=True)
    for dotted, new in spec["config"]:
        _put(config, dotted, new)
    choices = dict(BASE_CHOICES)
    choices.update(spec["choices"] or {})
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    (run / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(OVERRIDES + spec["overrides"]))
    (run / ".hydra" / "hydra.yaml").write_text(
        yaml.safe_dump({"hydra": {"runtime": {"choices": choices}}})
    )


class Spy:
    """Every ``importlib.import_module`` and Hydra ``_locate`` while installed."""

    def __init__(self, monkeypatch):
        import hydra._internal.instantiate._instantiate2 as instantiate_module
        import hydra._internal.utils as hydra_utils
        import hydra.utils as public_utils

        self.located: list[str] = []
        self.imported: list[str] = []
        locate, import_module = hydra_utils._locate, importlib.import_module

        def located(path):
            self.located.append(path)
            return locate(path)

        def imported(name, package=None):
            self.imported.append(name)
            return import_module(name, package)

        for module in (hydra_utils, instantiate_module, public_utils):
            monkeypatch.setattr(module, "_locate", located)
        monkeypatch.setattr(importlib, "import_module", imported)

    def foreign(self) -> list[str]:
        allowed = {t for ts in allowed_targets().values() for t in ts}
        return [n for n in self.located if n not in allowed] + [
            n for n in self.imported if n.split(".")[0] in FOREIGN_MODULES
        ]


@pytest.fixture
def payload_module(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "payload"
    folder.mkdir()
    marker = tmp_path / "MARKER"
    (folder / "evil_payload.py").write_text(
        f"import pathlib\ndef boom(*a, **k):\n    pathlib.Path({str(marker)!r}).write_text('ran')\n"
    )
    monkeypatch.syspath_prepend(str(folder))
    return marker


def _tree(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*")}


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(spec=run_directory)
def test_no_random_run_directory_runs_foreign_code_or_writes_elsewhere(
    monkeypatch, payload_module, capsys, spec
):
    work = Path(tempfile.mkdtemp(prefix="contrast-property-"))
    run = work / "run"
    _write(run, spec)
    before = _tree(work)
    with monkeypatch.context() as patch:  # this example's spy and folder only
        patch.chdir(work)
        spy = Spy(patch)
        code = cli.main(["eval", str(run)])  # no encoder.safetensors: refused, or exit 1 later
        out = capsys.readouterr()
        assert "Traceback" not in out.err + out.out
        assert code in (1, 2), (code, out.err)
        with contextlib.suppress(UserError):  # a config that rebuilds: build it all (meta device)
            validate(load_run(run).config())
    assert spy.foreign() == []
    assert not payload_module.exists()
    assert _tree(work) == before, "something was written"
    assert not CANARY.exists() and not (work.parent / f"{CANARY.name}-out").exists()


metadata_encoder = st.one_of(
    target_node,
    st.builds(
        lambda k, v: {"_target_": "contrastive_cli.models.encoders.ConvNet", k: v},
        st.sampled_from(["widths", "strides", "_args_", "_partial_", "extra"]),
        value,
    ),
)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(encoder=metadata_encoder, data=st.one_of(st.just("digits"), interpolation))
def test_no_random_weights_metadata_runs_foreign_code(
    tmp_path, monkeypatch, payload_module, capsys, encoder, data
):
    import torch
    from safetensors.torch import save_file

    from contrastive_cli.commands.eval import read_encoder_metadata

    path = Path(tempfile.mkdtemp(dir=tmp_path)) / "encoder.safetensors"
    meta = {
        "format": "contrast-encoder-v1",
        "encoder": json.dumps(encoder),
        "data": data,
        "channels": "1",
        "image_size": "8",
        "seed": "0",
    }
    save_file({"x": torch.zeros(1)}, str(path), metadata=meta)
    with monkeypatch.context() as patch:
        spy = Spy(patch)
        with contextlib.suppress(UserError):
            read_encoder_metadata(path)  # refused, or a rebuilt encoder of plain values
    assert spy.foreign() == []
    assert not payload_module.exists()

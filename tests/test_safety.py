"""contrastive_cli.safety: only shipped _target_s, each in its own slot, are ever imported
from a config read from a file; a property test mutates saved configs and encoder metadata
at random and records every import Hydra's instantiation machinery makes."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf

from contrastive_cli.config import compose
from contrastive_cli.errors import UserError
from contrastive_cli.rundirs import load_run
from contrastive_cli.safety import allowed_targets, check_targets, shipped_targets
from contrastive_cli.validate import validate
from tests.conftest import TINY

PAYLOADS = [
    "evil_payload.boom",
    "builtins.exec",
    "builtins.eval",
    "os.system",
    "subprocess.check_output",
    "pickle.loads",
    "contrastive_cli.run.run_training",  # shipped, but no slot names it
    "contrastive_cli.models.encoders.ConvNet",  # shipped, but only for the encoder slot
]


def test_the_slots_are_read_from_the_shipped_configs():
    slots = shipped_targets()
    assert slots["encoder"] >= {
        "contrastive_cli.models.encoders.ConvNet",
        "contrastive_cli.models.encoders.ResNet18",
    }
    assert "torch.optim.AdamW" in slots["optim.optimizer"]
    assert "torchvision.datasets.MNIST" in slots["data.source.downloader"]
    assert "device.type" not in slots and "data.augment.mean" not in slots
    assert all(t.count(".") >= 1 for targets in slots.values() for t in targets)


def test_a_shipped_target_in_another_slot_is_refused():
    cfg = compose([])
    cfg.loss.projector._target_ = "contrastive_cli.models.encoders.ConvNet"
    with pytest.raises(UserError, match=r"loss.projector._target_=.*allowed: "):
        check_targets(cfg)


def test_extra_targets_come_from_the_environment_only(monkeypatch):
    monkeypatch.setenv("CONTRAST_EXTRA_TARGETS", "encoder=mypkg.Wide, loss=mypkg.Method")
    allowed = allowed_targets()
    assert "mypkg.Wide" in allowed["encoder"] and "mypkg.Method" in allowed["loss"]
    monkeypatch.setenv("CONTRAST_EXTRA_TARGETS", "encoder=os.system; rm -rf")
    with pytest.raises(UserError, match="CONTRAST_EXTRA_TARGETS item"):
        allowed_targets()


# --------------------------------------------------------------------------- property test
def _base_config() -> dict:
    cfg = compose(TINY)
    cfg = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    return OmegaConf.to_container(cfg, resolve=True)


def _paths(node, prefix=()) -> list[tuple]:
    """Every path into a plain config (dict keys, list indices), nodes and leaves."""
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


def _set(node, path, value):
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value


target_node = st.builds(
    lambda t, args: {"_target_": t, **({"_args_": args} if args else {})},
    st.sampled_from(PAYLOADS),
    st.one_of(st.none(), st.lists(st.sampled_from(["1+1", "x", "/tmp"]), max_size=2)),
)
replacement = st.one_of(
    target_node,
    st.lists(target_node, min_size=1, max_size=2),
    st.builds(lambda t: {"nested": t}, target_node),
    st.sampled_from([10**30, -(10**30), 1e308, -1, 0, "", "${oc.env:HOME}", None, [1, [2]]]),
)


class ImportRecorder:
    """Records every dotted path Hydra is asked to import: ``hydra._internal.utils._locate``
    is what ``instantiate`` and ``get_object`` call for a ``_target_`` (and what validation
    uses to read a target's signature), before any import happens."""

    def __init__(self, monkeypatch):
        import hydra._internal.instantiate._instantiate2 as instantiate_module
        import hydra._internal.utils as hydra_utils
        import hydra.utils as public_utils

        self.names: list[str] = []
        original = hydra_utils._locate

        def recording(path: str):
            self.names.append(path)
            return original(path)

        monkeypatch.setattr(hydra_utils, "_locate", recording)
        monkeypatch.setattr(instantiate_module, "_locate", recording)
        monkeypatch.setattr(public_utils, "_locate", recording)

    def outside_the_allowlist(self) -> list[str]:
        allowed = {t for ts in allowed_targets().values() for t in ts}
        return [n for n in self.names if n not in allowed]


@pytest.fixture
def payload_module(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "payload"
    folder.mkdir()
    marker = folder / "MARKER"
    (folder / "evil_payload.py").write_text(
        f"import pathlib\ndef boom(*a, **k):\n    pathlib.Path({str(marker)!r}).write_text('ran')\n"
    )
    monkeypatch.syspath_prepend(str(folder))
    return marker


BASE = _base_config()
PATHS = _paths(BASE)


def _get(node, path):
    for key in path:
        node = node[key]
    return node


# Where an attack does the most: the object slots themselves and their _target_ strings.
SLOTS = [p for p in PATHS if isinstance(_get(BASE, p), dict) and "_target_" in _get(BASE, p)]
TARGETS = [(*p, "_target_") for p in SLOTS]
mutation = st.one_of(
    st.tuples(st.sampled_from(PATHS), replacement),
    st.tuples(st.sampled_from(SLOTS), target_node),
    st.tuples(st.sampled_from(TARGETS), st.sampled_from(PAYLOADS)),
)


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(mutations=st.lists(mutation, min_size=1, max_size=3))
def test_no_mutated_run_config_imports_anything_outside_the_allowlist(
    tmp_path, monkeypatch, payload_module, mutations
):
    cfg = json.loads(json.dumps(BASE))
    for path, value in mutations:
        try:
            _set(cfg, path, json.loads(json.dumps(value)))
        except (KeyError, IndexError, TypeError):  # an earlier mutation removed the parent
            continue
    run = tmp_path / "run"
    (run / ".hydra").mkdir(parents=True, exist_ok=True)
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump(cfg))
    recorder = ImportRecorder(monkeypatch)
    with contextlib.suppress(UserError):  # refused in one line: fine
        validate(load_run(run).config())
    assert not payload_module.exists(), "a payload ran"
    assert "evil_payload" not in sys.modules
    assert recorder.outside_the_allowlist() == []


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    encoder=st.one_of(
        target_node,
        st.builds(
            lambda key, value: {"_target_": "contrastive_cli.models.encoders.ConvNet", key: value},
            st.sampled_from(["widths", "strides", "_args_", "extra"]),
            replacement,
        ),
    ),
    data=st.sampled_from(["digits", "mnist", "../x", "", "digits\n"]),
    size=st.sampled_from(["8", "0", "99999", "-1", "8.0", "1e3"]),
)
def test_no_mutated_encoder_metadata_imports_anything_outside_the_allowlist(
    tmp_path, monkeypatch, payload_module, encoder, data, size
):
    import torch
    from safetensors.torch import save_file

    from contrastive_cli.commands.eval import _source

    path = tmp_path / "enc.safetensors"
    meta = {
        "format": "contrast-encoder-v1",
        "encoder": json.dumps(encoder),
        "data": data,
        "channels": "1",
        "image_size": size,
        "seed": "0",
    }
    save_file({"w": torch.zeros(1)}, str(path), metadata=meta)
    recorder = ImportRecorder(monkeypatch)
    with contextlib.suppress(UserError):
        _source(path, [])
    assert not payload_module.exists()
    assert "evil_payload" not in sys.modules
    assert recorder.outside_the_allowlist() == []

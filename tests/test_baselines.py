"""The baseline cache: a second evaluation on the same data and settings reads the raw-pixel
and random-init results instead of recomputing them; anything that changes a number misses;
a damaged entry or an unwritable cache folder is a warning, never a failed run."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from contrastive_cli.baselines import cache_dir
from contrastive_cli.config import build
from contrastive_cli.evaluation import evaluate_encoder
from contrastive_cli.parts import build_encoder, load_data
from tests.conftest import TINY

FAST = [
    "data=digits",
    "device=cpu",
    "eval.probe.max_iter=20",
    "eval.probe.weight_decays=[1e-3]",
    "eval.knn_k=[20,5]",
]


def evaluate(compose_cfg, *overrides: str):
    """(metrics, baselines, from_cache) of a random encoder (seed 1) on digits."""
    cfg = compose_cfg(*FAST, *overrides)
    data, runtime = load_data(cfg), build(cfg.device)
    encoder = build_encoder(cfg, 1)
    return evaluate_encoder(cfg, encoder, data, build(cfg.data.augment), runtime, cfg.trainer.seed)


def without_seconds(baselines: dict) -> dict:
    return {n: {k: v for k, v in m.items() if k != "seconds"} for n, m in baselines.items()}


def entries() -> list[Path]:
    return sorted(cache_dir().glob("*.json"))


def test_a_second_run_takes_both_baselines_from_the_cache(tmp_path, compose_cfg):
    """Two real runs on digits: the second one's results.json says 'from the cache' and holds
    the first one's baseline numbers exactly."""
    from contrastive_cli.run import run_training

    overrides = [*TINY, "trainer.epochs=1", "eval.every=0", "eval.plots=false", "device=cpu"]
    first = run_training(compose_cfg(*overrides), tmp_path / "first")
    second = run_training(compose_cfg(*overrides), tmp_path / "second")
    assert first["baselines_from_cache"] == {"raw_pixels": False, "random_init": False}
    assert second["baselines_from_cache"] == {"raw_pixels": True, "random_init": True}
    saved = json.loads((tmp_path / "second" / "results.json").read_text())
    assert saved["baselines_from_cache"] == {"raw_pixels": True, "random_init": True}
    assert without_seconds(saved["baselines"]) == without_seconds(first["baselines"])
    assert saved["metrics"] == second["metrics"]  # the trained encoder is always evaluated
    assert len(entries()) == 2


@pytest.mark.parametrize(
    "change,pixels_hit,random_hit",
    [
        ("eval.knn_temperature=0.2", False, False),
        ("eval.metrics=[knn]", False, False),  # the evaluators that run
        ("eval.probe.weight_decays=[1e-2]", False, False),
        ("trainer.seed=3", False, False),  # splits the probe's held-out part
        ("encoder.widths=[16,32,64,128]", True, False),
        ("data.mean=[0.5]", True, False),  # the encoder's input normalisation
        ("eval.batch_size=256", True, False),
        ("trainer.epochs=1", True, True),  # training settings do not touch the baselines
        ("eval.plots=false", True, True),
    ],
)
def test_only_changes_that_move_a_number_miss_the_cache(
    compose_cfg, change, pixels_hit, random_hit
):
    _, before, _ = evaluate(compose_cfg)
    _, after, from_cache = evaluate(compose_cfg, change)
    assert from_cache == {"raw_pixels": pixels_hit, "random_init": random_hit}
    for name, hit in from_cache.items():
        if hit:
            assert without_seconds(after)[name] == without_seconds(before)[name]


def test_a_code_change_misses_the_cache(compose_cfg, monkeypatch):
    """A stale number never survives an edit of the code that computed it, even where
    PROTOCOL_VERSION was not bumped."""
    from contrastive_cli import baselines

    evaluate(compose_cfg)
    assert evaluate(compose_cfg)[2] == {"raw_pixels": True, "random_init": True}
    monkeypatch.setattr(baselines, "code_digest", lambda: "edited")
    assert evaluate(compose_cfg)[2] == {"raw_pixels": False, "random_init": False}


def test_different_images_miss_the_cache(compose_cfg):
    evaluate(compose_cfg)
    _, _, from_cache = evaluate(compose_cfg, "data.source.test_fraction=0.3")
    assert from_cache == {"raw_pixels": False, "random_init": False}


def test_a_damaged_entry_is_recomputed_with_a_warning(compose_cfg, caplog):
    _, first, _ = evaluate(compose_cfg)
    damaged = {p: text for p, text in zip(entries(), ("{not json", '{"format": 1}'), strict=True)}
    for path, text in damaged.items():
        path.write_text(text)
    with caplog.at_level(logging.WARNING):
        _, again, from_cache = evaluate(compose_cfg)
    assert from_cache == {"raw_pixels": False, "random_init": False}
    assert without_seconds(again) == without_seconds(first)
    for path in damaged:
        assert f"baseline cache entry {path} is damaged; recomputing" in caplog.text
        assert json.loads(path.read_text())["format"] == "contrast-baseline-v1"  # rewritten
    assert evaluate(compose_cfg)[2] == {"raw_pixels": True, "random_init": True}


def test_an_unwritable_cache_folder_is_a_warning(compose_cfg, caplog, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("CONTRAST_CACHE", str(blocker))  # its baselines/ cannot be created
    with caplog.at_level(logging.WARNING):
        metrics, baselines, from_cache = evaluate(compose_cfg)
        assert evaluate(compose_cfg)[2] == from_cache == {"raw_pixels": False, "random_init": False}
    assert set(baselines) == {"raw_pixels", "random_init"} and "linear_top1" in metrics
    assert f"cannot write the baseline cache in {blocker / 'baselines'}" in caplog.text


def test_cache_baselines_false_neither_reads_nor_writes(compose_cfg):
    evaluate(compose_cfg, "eval.cache_baselines=false")
    assert entries() == []
    evaluate(compose_cfg)
    _, _, from_cache = evaluate(compose_cfg, "eval.cache_baselines=false")
    assert from_cache == {"raw_pixels": False, "random_init": False}


def test_cache_dir_follows_contrast_cache_then_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("CONTRAST_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c" / "baselines"
    monkeypatch.delenv("CONTRAST_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "contrast" / "baselines"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == Path(os.path.expanduser("~")) / ".cache" / "contrast" / "baselines"


def test_evaluation_says_what_it_is_doing(compose_cfg, caplog):
    """No silence after the last epoch: a line before and after each evaluated entry (raw
    pixels, the random-init encoder, the trained one), then none for cached ones."""
    with caplog.at_level(logging.INFO, logger="contrastive_cli"):
        evaluate(compose_cfg)
    lines = [r.getMessage() for r in caplog.records]
    starts = [ln for ln in lines if ln.startswith("evaluating ")]
    assert [ln.split(" (")[0] for ln in starts] == [
        "evaluating 1/3: raw pixels",
        "evaluating 2/3: trained encoder",
        "evaluating 3/3: random-init encoder",
    ]
    assert "1,437 train + 360 test images" in starts[0]
    assert sum(ln.startswith("evaluated ") for ln in lines) == 3
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="contrastive_cli"):
        evaluate(compose_cfg)  # both baselines from the cache now
    starts = [r.getMessage() for r in caplog.records if r.getMessage().startswith("evaluating")]
    assert [ln.split(" (")[0] for ln in starts] == ["evaluating 1/1: trained encoder"]

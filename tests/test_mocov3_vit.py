"""MoCo v3's ViT recipe (+experiment=mocov3_vit): it composes to the paper's settings, trains
on digits, and its frozen random patch embedding stays what it was drawn as through training,
a kill and a resume."""

from __future__ import annotations

import subprocess
import sys

import torch
from safetensors.torch import load_file

from contrastive_cli.config import compose
from contrastive_cli.parts import build_encoder
from tests.conftest import REPO, read_results, run_cli

# digits with 90% held out as the test split: 143 train images, 2 steps of 64 per epoch;
# ViT-Ti (2x2 patches of 4 px) and narrow heads so that a step takes well under a second.
SMALL = [
    "+experiment=mocov3_vit",
    "data=digits",
    "data.source.test_fraction=0.9",
    "encoder=vit_tiny",
    "+encoder.kwargs.depth=2",
    "loss.projector.hidden_dim=64",
    "loss.predictor.hidden_dim=64",
    "trainer.batch_size=64",
    "trainer.epochs=2",
    "trainer.checkpoint_every_s=0",
    "trainer.deterministic=true",
    "optim.scheduler.warmup_epochs=1",
    "eval.every=0",
    "eval.baselines=false",
    "eval.plots=false",
    "eval.probe.max_iter=30",
]
PATCH = "model.patch_embed.proj"


def test_the_recipe_is_the_papers_vit_settings(compose_cfg):
    cfg = compose_cfg("+experiment=mocov3_vit")
    assert cfg.encoder.name == "vit_small_patch16_224" and cfg.encoder.freeze_patch_embed
    assert cfg.loss._target_.endswith("MoCoV3")
    assert (cfg.loss.temperature, cfg.loss.base_momentum) == (0.2, 0.99)
    assert cfg.optim.optimizer._target_ == "torch.optim.AdamW"
    assert (cfg.optim.lr, cfg.optim.lr_scaling, cfg.optim.reference_batch) == (
        1.5e-4,
        "linear",
        256,
    )
    assert cfg.optim.optimizer.weight_decay == 0.1
    assert (cfg.trainer.epochs, cfg.optim.scheduler.warmup_epochs) == (300, 40)
    p, q = cfg.loss.projector, cfg.loss.predictor
    assert (p.layers, p.hidden_dim, p.out_dim, p.batch_norm, p.output_batch_norm) == (
        3,
        4096,
        256,
        True,
        True,
    )
    assert (q.get("layers", 2), q.hidden_dim, q.out_dim, q.batch_norm, q.output_batch_norm) == (
        2,
        4096,
        256,
        True,
        True,
    )


def initial_patch() -> dict[str, torch.Tensor]:
    """The patch projection a run of SMALL starts from: its encoder built from the seed."""
    cfg = compose(SMALL)
    encoder = build_encoder(cfg, cfg.trainer.seed)
    return {k: v for k, v in encoder.state_dict().items() if k.startswith(PATCH)}


def test_the_recipe_trains_and_its_patch_embedding_stays_fixed_through_a_kill_and_resume(
    tmp_path,
):
    run = tmp_path / "run"
    args = [sys.executable, "-m", "tests.harness", "kill-in-step", "3", "--", "train", *SMALL]
    proc = subprocess.run(
        [*args, f"hydra.run.dir={run}"], cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == -9, proc.stderr  # killed in epoch 2, after epoch 1's checkpoint
    run_cli(["resume", str(run)], cwd=tmp_path, check=True)
    results = read_results(run)
    assert results["status"] == "completed" and results["epochs"] == 2
    start = initial_patch()
    trained = load_file(run / "encoder.safetensors")
    assert set(start) == {f"{PATCH}.weight", f"{PATCH}.bias"}
    for key, value in start.items():
        assert torch.equal(trained[key], value), key
    checkpoint = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    model = checkpoint["method"]
    for prefix in ("encoder.", "momentum_encoder."):
        for key, value in start.items():
            assert torch.equal(model[prefix + key], value), prefix + key
    # ... while the rest of the ViT trained
    fresh = build_encoder(compose(SMALL), 0).state_dict()
    assert not torch.equal(
        trained["model.blocks.0.attn.qkv.weight"], fresh["model.blocks.0.attn.qkv.weight"]
    )

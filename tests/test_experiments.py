"""Experiments you can trust: reproduce, resume after faults, sweeps with failures, runs,
eval, plot. One tiny deterministic reference run is shared by the module."""

from __future__ import annotations

import csv
import json
import re
import shutil
import signal
import struct
import subprocess
import sys
import time

import pytest

from contrastive_cli.commands.reproduce import compared_values
from tests.conftest import REPO, TINY, read_results, run_cli, run_dirs

# 3 epochs x 22 steps on digits, deterministic kernels; no plots (they are tested below).
CFG = [o for o in TINY if not o.startswith("trainer.epochs")] + [
    "trainer.epochs=3",
    "trainer.deterministic=true",
    "eval.plots=false",
]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted run of CFG: what every resumed or reproduced run must equal."""
    root = tmp_path_factory.mktemp("reference")
    run_cli(["train", *CFG, f"hydra.run.dir={root / 'run'}"], cwd=root, check=True)
    return root / "run"


def test_reproduce_is_bit_identical(reference, tmp_path):
    proc = run_cli(
        ["reproduce", str(reference), "--out", str(tmp_path / "again")], cwd=tmp_path, check=True
    )
    assert "identical" in proc.stdout
    assert compared_values(tmp_path / "again") == compared_values(reference)
    # The saved config is complete and resolved: no interpolations left in it.
    assert "${" not in (reference / ".hydra" / "config.yaml").read_text()


def killed(fault: str, n: int, train_args: list[str]) -> None:
    """``contrast train TRAIN_ARGS`` under the fault harness (``tests.harness``), SIGKILLed at
    its ``fault`` number ``n``."""
    args = [sys.executable, "-m", "tests.harness", fault, str(n), "--", "train", *train_args]
    proc = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr


# make test keeps one kill in a step (epoch 2, after a checkpoint) and one in a save; a kill
# in epoch 1, before any checkpoint, runs in make test-all.
@pytest.mark.parametrize(
    ("fault", "n"),
    [
        pytest.param("kill-in-step", 2, marks=pytest.mark.slow),
        ("kill-in-step", 40),
        ("kill-in-save", 2),
    ],
)
def test_sigkill_then_resume_equals_an_uninterrupted_run(reference, tmp_path, fault, n):
    run = tmp_path / "run"
    killed(fault, n, [*CFG, f"hydra.run.dir={run}"])
    assert not (run / "results.json").exists()
    run_cli(["resume", str(run)], cwd=tmp_path, check=True)
    assert read_results(run)["status"] == "completed"
    assert compared_values(run) == compared_values(reference)


@pytest.mark.parametrize(
    "method",
    [
        # the teacher, the centre, the teacher temperature's clock; local crops (make test
        # resumes SwAV: queue, epoch clock, local crops)
        pytest.param(["loss=dino", "data.augment.local_crops=2"], marks=pytest.mark.slow),
        # the support set (a queue of 256: full from the checkpoint on)
        pytest.param(["loss=nnclr", "loss.queue_size=256"], marks=pytest.mark.slow),
        # the momentum encoder and its cosine schedule's place
        pytest.param(["loss=mocov3"], marks=pytest.mark.slow),
        # the queue (full in the checkpoint), the epoch clock: prototypes thaw at epoch 3,
        # after the resume; local crops
        [
            "loss=swav",
            "loss.queue_size=128",
            "loss.queue_start_epoch=0",
            "loss.freeze_prototypes_epochs=2",
            "data.augment.local_crops=2",
        ],
    ],
    ids=["dino", "nnclr", "mocov3", "swav"],
)
def test_queue_and_clock_methods_killed_then_resumed_equal_an_uninterrupted_run(tmp_path, method):
    """Killed in epoch 2 and resumed from the end of epoch 1: state beyond weights (DINO's
    teacher, centre and temperature clock, queues, momentum encoder, SwAV's epoch clock and
    frozen-prototype epochs) is in the checkpoint."""
    cfg = [*CFG, *method, "eval.baselines=false"]
    run_cli(["train", *cfg, f"hydra.run.dir={tmp_path / 'whole'}"], cwd=tmp_path, check=True)
    run = tmp_path / "run"
    killed("kill-in-step", 30, [*cfg, f"hydra.run.dir={run}"])
    run_cli(["resume", str(run)], cwd=tmp_path, check=True)
    assert compared_values(run) == compared_values(tmp_path / "whole")


def test_sigterm_saves_a_checkpoint_exits_143_and_resumes_exactly(reference, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "contrastive_cli", "train", *CFG, f"hydra.run.dir={run}"],
        cwd=tmp_path,
        env={**__import__("os").environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 300
    while not (run / "metrics.jsonl").exists() or not (run / "metrics.jsonl").read_text().strip():
        assert proc.poll() is None and time.time() < deadline, (
            "the run ended before its first epoch"
        )
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 143
    assert (run / "checkpoints" / "last.pt").is_file()
    results = read_results(run)
    assert results["status"] == "interrupted"
    assert f"contrast resume {run}" in out
    [stopped_at] = re.findall(r"stopped at epoch (\d+/\d+)", out)
    resumed = run_cli(["resume", str(run)], cwd=tmp_path, check=True)
    assert compared_values(run) == compared_values(reference)
    # the same epoch number in both messages; wall time counts the first attempt too
    assert f"resuming from {run / 'checkpoints' / 'last.pt'}: epoch {stopped_at}," in (
        resumed.stdout + resumed.stderr
    )
    final = read_results(run)
    assert final["wall_time_s"] >= max(final["train_time_s"], results["wall_time_s"])


def test_sweep_with_a_failing_job_finishes_the_others_and_exits_nonzero(tmp_path):
    proc = run_cli(
        ["train", "-m", "trainer.batch_size=64,100000", *[o for o in CFG if "batch_size" not in o]],
        cwd=tmp_path,
    )
    assert proc.returncode == 1
    runs = run_dirs(tmp_path / "outputs" / "multirun")
    statuses = sorted(read_results(r)["status"] for r in runs)
    assert statuses == ["completed", "failed"]
    assert "failed" in proc.stdout and "trainer.batch_size=100000" in proc.stdout
    [sweep] = {r.parent for r in runs}
    rows = list(csv.DictReader((sweep / "sweep_results.csv").open()))
    assert sorted(r["status"] for r in rows) == ["completed", "failed"]
    assert "larger than" in next(r["error"] for r in rows if r["status"] == "failed")


def test_runs_lists_sorts_filters_and_writes_csv(reference, tmp_path):
    proc = run_cli(
        ["runs", str(reference.parent), "--sort", "knn", "--csv", str(tmp_path / "r.csv")],
        cwd=tmp_path,
        check=True,
    )
    assert "ntxent" in proc.stdout and "completed" in proc.stdout
    [row] = list(csv.DictReader((tmp_path / "r.csv").open()))
    results = read_results(reference)
    assert row["loss"] == "ntxent" and row["data"] == "digits" and row["status"] == "completed"
    assert float(row["knn"]) == results["metrics"]["knn_k200"]
    for column in ("lowshot_1pct", "recall_at_1", "map_at_r", "rankme", "alignment", "uniformity"):
        assert float(row[column]) == pytest.approx(results["metrics"][column], rel=1e-6)
    assert "trainer.epochs=3" in row["overrides"]
    by_alignment = run_cli(["runs", str(reference.parent), "--sort", "alignment"], cwd=tmp_path)
    assert by_alignment.returncode == 0 and "rankme" in by_alignment.stdout.splitlines()[0]
    none = run_cli(
        ["runs", str(reference.parent), "--where", "loss=moco", "--json", "-"],
        cwd=tmp_path,
        check=True,
    )
    assert json.loads(none.stdout) == []
    some = run_cli(
        ["runs", str(reference.parent), "--where", "trainer.epochs=3", "--json", "-"],
        cwd=tmp_path,
        check=True,
    )
    assert len(json.loads(some.stdout)) == 1


def test_runs_leaves_out_mlflows_artifact_copies(reference, tmp_path):
    """MLflow keeps a copy of a run's files under outputs/mlartifacts/: not a second run."""
    from contrastive_cli.rundirs import find_runs

    outputs = tmp_path / "outputs"
    shutil.copytree(reference, outputs / "2026-12-05" / "run")
    shutil.copytree(reference, outputs / "mlartifacts" / "1" / "abc123" / "artifacts")
    assert [r.path for r in find_runs([outputs])] == [outputs / "2026-12-05" / "run"]


def test_eval_of_the_saved_encoder_reproduces_the_runs_numbers(reference, tmp_path):
    out = tmp_path / "eval.json"
    run_cli(["eval", str(reference), "--out", str(out)], cwd=tmp_path, check=True)
    evaluated = json.loads(out.read_text())
    keys = ("knn_k200", "knn_k20", "linear_top1", "lowshot_10pct", "map_at_r", "rankme")
    for key in (*keys, "rankme_projector"):  # the projector: from the last checkpoint
        assert evaluated["metrics"][key] == read_results(reference)["metrics"][key]


def test_eval_of_a_run_without_checkpoints_leaves_out_only_the_projectors_rankme(
    reference, tmp_path
):
    """trainer.checkpoint=false keeps no projector weights: rankme_projector is left out,
    the rest computed (and a checkpoint of another state than the encoder's is not used)."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    shutil.rmtree(run / "checkpoints")
    args = ["eval.metrics=[rankme]", "eval.baselines=false"]
    out = tmp_path / "eval.json"
    run_cli(["eval", str(run), *args, "--out", str(out)], cwd=tmp_path, check=True)
    metrics = json.loads(out.read_text())["metrics"]
    assert metrics["rankme"] == read_results(reference)["metrics"]["rankme"]
    assert "rankme_projector" not in metrics


def test_eval_of_a_run_made_before_the_new_metrics_computes_them(reference, tmp_path):
    """A run directory as the main branch wrote it before low-shot, retrieval and the
    label-free metrics: eval.metrics=[knn, linear] and none of their settings."""
    import yaml

    old = tmp_path / "old"
    shutil.copytree(reference, old)
    config = yaml.safe_load((old / ".hydra" / "config.yaml").read_text())
    new = ("lowshot", "lowshot_draws", "lowshot_weight_decays", "retrieval_queries")
    for key in (*new, "labelfree_size", "finetune"):
        del config["eval"][key]
    config["eval"]["metrics"] = ["knn", "linear"]
    (old / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "eval.json"
    run_cli(["eval", str(old), "--out", str(out)], cwd=tmp_path, check=True)
    metrics = json.loads(out.read_text())["metrics"]
    expected = read_results(reference)["metrics"]
    for key in ("knn_k200", "lowshot_1pct", "lowshot_1pct_std", "recall_at_5", "uniformity"):
        assert metrics[key] == expected[key]


def _png_size(path):
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", header[16:24])


def test_plot_writes_curves_and_embedding_pngs(reference, tmp_path):
    run_cli(["plot", str(reference), "--out", str(tmp_path / "plots")], cwd=tmp_path, check=True)
    assert _png_size(tmp_path / "plots" / "curves.png") == (1000, 400)
    assert _png_size(tmp_path / "plots" / "embedding.png") == (700, 700)


def test_plot_keeps_a_runs_own_embedding_map_unless_asked_to_redraw(reference, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    first = run_cli(["plot", str(run)], cwd=tmp_path, check=True)
    drawn = run / "plots" / "embedding.png"
    assert "then t-SNE" in first.stdout and _png_size(drawn) == (700, 700)
    assert "Warning" not in first.stderr
    stamp = drawn.stat().st_mtime_ns
    again = run_cli(["plot", str(run)], cwd=tmp_path, check=True)
    assert "kept" in again.stdout and "t-SNE" not in again.stdout
    assert drawn.stat().st_mtime_ns == stamp and str(drawn) in again.stdout
    redraw = run_cli(["plot", str(run), "--redraw"], cwd=tmp_path, check=True)
    assert "then t-SNE" in redraw.stdout and drawn.stat().st_mtime_ns != stamp


def test_resume_of_a_completed_run_changes_nothing(reference, tmp_path):
    before = (reference / "results.json").read_text()
    proc = run_cli(["resume", str(reference)], cwd=tmp_path, check=True)
    assert "already completed" in proc.stdout
    assert (reference / "results.json").read_text() == before


def test_train_refuses_to_write_into_an_existing_run(reference, tmp_path):
    before = {p: p.read_bytes() for p in reference.rglob("*") if p.is_file()}
    proc = run_cli(["train", *CFG, f"hydra.run.dir={reference}"], cwd=tmp_path)
    assert proc.returncode == 2
    assert "already holds a run" in proc.stderr and "Traceback" not in proc.stderr
    assert {p: p.read_bytes() for p in reference.rglob("*") if p.is_file()} == before


def test_a_time_budget_fixes_the_epochs_in_the_saved_config_and_reproduces(tmp_path):
    """trainer.time_budget: the first epoch's time decides the epoch count, which replaces
    the budget in .hydra/config.yaml, so reproduce reruns exactly that many epochs."""
    import yaml

    run = tmp_path / "run"
    cfg = [o for o in CFG if not o.startswith("trainer.epochs")]
    proc = run_cli(
        ["train", *cfg, "trainer.time_budget=2s", "eval.every=0", f"hydra.run.dir={run}"],
        cwd=tmp_path,
        check=True,
    )
    saved = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())["trainer"]
    epochs = len((run / "metrics.jsonl").read_text().splitlines())
    assert saved["time_budget"] is None and saved["epochs"] == epochs >= 1
    assert read_results(run)["epochs"] == epochs
    assert f"so {epochs} epoch{'s' if epochs != 1 else ''} (now in" in proc.stdout
    again = run_cli(
        ["reproduce", str(run), "--out", str(tmp_path / "again")], cwd=tmp_path, check=True
    )
    assert "identical" in again.stdout


def test_a_time_budget_keeps_a_run_whose_loss_follows_the_epochs_resumable(tmp_path):
    """SwAV's loss.epochs is ${trainer.epochs} (its epoch clock): when trainer.time_budget
    fixes the epochs, the checkpoint's config digest must be that of the saved config, or an
    interrupted run could not resume (it was the stale loss.epochs before)."""
    import torch
    import yaml

    from contrastive_cli.restore import _check_resumable

    run = tmp_path / "run"
    cfg = [o for o in CFG if not o.startswith("trainer.epochs")]
    args = ["train", *cfg, "loss=swav", "trainer.epochs=3", "trainer.time_budget=4s"]
    run_cli(
        [*args, "eval.every=0", "eval.baselines=false", f"hydra.run.dir={run}"],
        cwd=tmp_path,
        check=True,
    )
    saved = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
    assert saved["loss"]["epochs"] == saved["trainer"]["epochs"]
    path = run / "checkpoints" / "last.pt"
    _check_resumable(torch.load(path, weights_only=True), saved, path)


def test_a_time_budget_spends_what_the_first_step_compiled_once():
    """A first epoch slowed by compilation (its first step) must not shrink the epoch count:
    900 s, a 100 s first epoch of which 60 s were the first step, 40 s steady epochs ->
    1 + (900 - 100) // 40 = 21 epochs, not 900 // 100 = 9."""
    from contrastive_cli.callbacks.budget import fit_to_budget as _fit_to_budget
    from contrastive_cli.callbacks.budget import parse_duration
    from contrastive_cli.distributed import SINGLE

    assert parse_duration("15m") == 900.0 and parse_duration("90s") == 90.0
    assert _fit_to_budget("15m", 100.0, 40.0, SINGLE) == 21
    assert _fit_to_budget("15m", 100.0, 100.0, SINGLE) == 9
    assert _fit_to_budget("10s", 30.0, 30.0, SINGLE) == 1  # never fewer than the one run


def test_eval_heldout_scores_on_part_of_train_never_on_test(reference, tmp_path):
    """`contrast eval RUN --heldout F`: the k-NN bank and probe fit on (1-F) of the train
    split, scored on the other F (fixed, stratified); the test split plays no part."""
    import torch

    from contrastive_cli.commands.eval import heldout_split
    from contrastive_cli.data.datasets import ImageData, Split

    images = torch.arange(100, dtype=torch.uint8).view(100, 1, 1, 1)
    labels = torch.arange(100) % 4
    test = Split(torch.zeros(7, 1, 1, 1, dtype=torch.uint8), torch.zeros(7, dtype=torch.long))
    data = ImageData(
        pretrain=Split(images, labels), train=Split(images, labels), test=test, num_classes=4
    )
    held = heldout_split(data, 0.2, "x")
    assert len(held.test) == 20 and len(held.train) == 80
    assert torch.bincount(held.test.labels).tolist() == [5, 5, 5, 5]  # stratified
    seen = sorted(held.train.images.flatten().tolist() + held.test.images.flatten().tolist())
    assert seen == list(range(100))  # disjoint, and together the whole train split
    assert held.test is not test and held.pretrain is data.pretrain
    assert heldout_split(data, 0.2, "x").test.images.equal(held.test.images)  # fixed

    # one evaluation (--out is tested with the test split above): its file in evals/
    default = run_cli(
        ["eval", str(reference), "--heldout", "0.25", "eval.baselines=false"], cwd=tmp_path
    )
    assert "held-out (train)" in default.stdout
    [saved] = (reference / "evals").glob("digits_heldout-train_*.json")
    assert json.loads(saved.read_text())["split"] == "heldout 0.25 of train"
    bad = run_cli(["eval", str(reference), "--heldout", "1.5"], cwd=tmp_path)
    assert bad.returncode == 2 and "--heldout=1.5 is not allowed" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_the_first_epoch_resumed_midway_trains_and_reports_no_first_step_time():
    """The first step's time (compilation, warm-up) is reported only by the epoch that began
    the run; an epoch resumed from a mid-epoch checkpoint has no first step to time and must
    still finish (the loop once read an unset time there)."""
    from contrastive_cli.builder import build_run
    from contrastive_cli.config import compose
    from contrastive_cli.events import Callback
    from contrastive_cli.train import Progress, train

    class Records(Callback):
        def __init__(self):
            self.records: list[dict] = []

        def epoch_end(self, loop, record):
            self.records.append(record)

    def first_epoch(progress: Progress) -> dict:
        built = build_run(compose([*TINY, "device=cpu", "trainer.epochs=1", "eval.every=0"]))
        callback = Records()
        records = callback.records
        for _ in range(progress.step):  # the schedule where the checkpoint left it
            built.training.scheduler.step()
        train(built.training, built.augment, built.runtime, 1, 0, progress, [callback])
        return records[0]

    fresh = first_epoch(Progress())
    assert fresh["first_step_s"] > 0
    resumed = first_epoch(Progress(step=3, batch=3, step_losses=[5.0, 5.0, 5.0], epoch_seconds=1.0))
    assert "first_step_s" not in resumed and resumed["epoch"] == 1


def test_metrics_jsonl_holds_the_documented_fields_only(reference):
    """One line per epoch with the fields the README lists; the first step's time, which
    only trainer.time_budget reads, is not logged."""
    lines = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3]
    for r in lines:
        assert set(r) == {
            *("epoch", "step", "loss", "lr", "images_per_s", "epoch_time_s", "knn"),
            *("rankme", "rankme_projector", "alignment", "uniformity"),  # the label-free monitor
        }

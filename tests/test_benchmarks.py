"""`make bench` smoke test: every benchmark runs at a tiny size and writes valid JSON with the
expected keys, its markdown table and the combined README. The numbers are not checked:
speed targets live in the benchmarks (measured by `make bench`), never in tests."""

from __future__ import annotations

import importlib
import json
import math

import pytest
import torch

from benchmarks.__main__ import main, parse

TINY = ["--quick", "--losses", "ntxent", "--data", "synthetic", "--threads", "1", "--workers", "1"]
MACHINE = {
    "cpu",
    "cores",
    "usable_cores",
    "torch_threads",
    "torch",
    "python",
    "date",
    "load_average_1m",
}
STATS = {"median", "min", "max", "runs"}


def is_stat(s: object) -> bool:
    return (
        isinstance(s, dict)
        and set(s) >= STATS
        and s["min"] <= s["median"] <= s["max"]
        and all(math.isfinite(v) for v in s["runs"])
    )


def run_bench(name: str, out) -> dict:
    threads = torch.get_num_threads()
    try:
        assert main([name, *TINY, "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    payload = json.loads((out / f"{name}.json").read_text())
    assert payload["benchmark"] == name
    assert set(payload["machine"]) >= MACHINE
    assert payload["settings"]["quick"] is True
    assert payload["notes"] and payload["table_md"].startswith("| ")
    markdown = (out / f"{name}.md").read_text()
    assert payload["title"] in markdown and payload["table_md"] in markdown
    assert payload["table_md"] in (out / "README.md").read_text()
    return payload


def test_throughput(tmp_path):
    [r] = run_bench("throughput", tmp_path)["results"]
    assert r["loss"] == "ntxent" and r["steps"] == 3
    for mode in ("contrast", "pure", "conventional", "data_path"):
        for key in ("seconds", "cpu_seconds", "images_per_s", "epoch_s"):
            assert is_stat(r[mode][key]), (mode, key)
    for key in (
        "epoch_over_pure",
        "epoch_over_pure_cpu",
        "conventional_over_contrast",
        "data_path_share",
    ):
        assert is_stat(r[key]) and r[key]["median"] > 0
    assert isinstance(r["meets_epoch_target"], bool) and isinstance(
        r["meets_conventional_target"], bool
    )
    # one step of the cnn on 28x28 views: at least a million multiply-adds
    assert r["flops_per_step"] > 1e6 and is_stat(r["gflops"]["fp32"])
    assert r["gflops"]["fp32"]["median"] > 0
    if r["device"].split(" ")[0] == "cpu":  # the peak is estimated for CPUs only
        peak = r["peak"]
        assert peak["fp32_gflops"] > 0 and peak["bf16_gflops"] >= peak["fp32_gflops"]


def test_evaluation(tmp_path):
    results = run_bench("evaluation", tmp_path)["results"]
    assert [r["dim"] for r in results] == [256, 784]  # cnn features, raw pixels
    for r in results:
        for key in ("extract_s", "knn_s", "probe_s", "knn_plus_probe_s"):
            assert is_stat(r[key]), key
        assert {"knn_k200", "knn_k20", "linear_top1"} <= set(r["accuracy"])
        assert all(0 <= r["accuracy"][k] <= 1 for k in ("knn_k200", "knn_k20", "linear_top1"))
    assert results[0]["reference_probe"]["seconds"] > 0
    for key in ("labelfree_s", "retrieval_s", "lowshot_s"):  # what they add, timed
        assert is_stat(results[0][key]), key
    assert {"rankme", "alignment", "uniformity", "map_at_r", "lowshot_1pct"} <= set(
        results[0]["added_metrics"]
    )


def test_memory(tmp_path):
    results = run_bench("memory", tmp_path)["results"]
    cases = [r["case"] for r in results]
    assert any(c.startswith("contrast:") for c in cases) and any(
        c.startswith("conventional:") for c in cases
    )
    for r in results:
        assert (
            is_stat(r["peak_pss_mb"])
            and r["peak_rss_mb"]["median"] > 10
            and r["ru_maxrss_mb"]["median"] > 10
        )
    conventional = next(r for r in results if r["case"].startswith("conventional:"))
    assert conventional["processes"]["max"] >= 2  # the main process and its worker


def test_quality(tmp_path):
    payload = run_bench("quality", tmp_path)
    assert {"raw_pixels", "random_init"} <= set(payload["results"]["baselines"])
    [r] = payload["results"]["runs"]
    for budget in ("fixed_epochs", "time_budget"):
        metrics = r[budget]["metrics"]
        assert set(metrics) == {"knn_k200", "knn_k20", "linear_top1"} and all(
            0 <= v <= 1 for v in metrics.values()
        )
        assert r[budget]["epochs"] >= 1 and r[budget]["train_time_s"] > 0


def test_options():
    opts, names = parse(["--only", "memory,throughput", "--quick"])
    assert names == ["throughput", "memory"] and opts.quick and opts.out.name == "quick"
    opts, names = parse([])
    assert names == ["throughput", "evaluation", "memory", "quality", "distributed", "encoders"]
    assert opts.repeats == 5
    opts, names = parse(["encoders", "--encoders", "vit_tiny,cnn"])
    assert names == ["encoders"] and opts.extra["encoders"] == ["vit_tiny", "cnn"]
    with pytest.raises(SystemExit):
        parse(["nonsense"])


def test_an_unknown_encoder_is_a_usage_error_naming_the_choices(capsys):
    with pytest.raises(SystemExit) as stop:
        parse(["encoders", "--encoders", "cnn,resnet5"])
    err = capsys.readouterr().err.splitlines()[-1]
    assert stop.value.code == 2 and "--encoders resnet5: choose from cnn," in err


def test_distributed(tmp_path, no_datasets):
    """The default ``--data auto`` on a machine without Fashion-MNIST: the benchmark's own
    fallback (digits at 28x28), in every process, with no download attempt."""
    opts, _ = parse(["--quick", "--out", str(tmp_path)])
    result = importlib.import_module("benchmarks.distributed").run(opts)
    assert len(result["results"]) == 4
    assert all(r["seconds_per_step"] > 0 for r in result["results"].values())
    assert "all-gather" in (tmp_path / "distributed.md").read_text()


def test_auto_data_falls_back_without_fashion_mnist_and_leaves_nothing(no_datasets):
    """``--data auto`` looks for Fashion-MNIST on disk only: without it, digits at 28x28, and
    no download attempt or empty ``data/FashionMNIST`` left behind."""
    from benchmarks.common import Options, load_images

    opts = Options(data="auto")
    data, name = load_images(opts, opts.config(), size=256)
    assert name.startswith("digits") and data.train.images.shape[1:] == (1, 28, 28)
    assert not any(no_datasets.iterdir())


def test_encoders_times_the_pure_step_of_one_encoder():
    """`make bench`'s encoder table, one row, in this process: cnn at Fashion-MNIST's shape."""
    from benchmarks.encoders import measure_one

    r = measure_one("cnn", "fashion_mnist", 4, 1, 1, "cpu")
    assert r["image"] == "1x28x28" and r["out_dim"] == 256 and r["batch"] == 4
    assert r["flops_per_step"] > 0 and r["peak_mib"] >= 0
    for precision in ("fp32", "bf16"):
        ips = r["images_per_s"][precision]["median"]
        gflops = r["gflops"][precision]["median"]
        # images/s and GFLOP/s come from the same timings: GFLOP/s = FLOPs per image x images/s
        assert gflops == pytest.approx(r["flops_per_step"] / 4 * ips / 1e9, rel=1e-9)

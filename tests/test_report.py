"""The results table printed at the end of a run."""

from __future__ import annotations

from contrastive_cli.report import results_table


def test_every_row_of_the_results_table_is_aligned():
    """The gain row's label is the longest: its numbers must still line up with the others."""
    results = {
        "loss": "ntxent",
        "metrics": {"knn_k200": 0.9639, "knn_k20": 0.9778, "linear_top1": 0.9833},
        "baselines": {
            "raw_pixels": {"knn_k200": 0.9333, "knn_k20": 0.9694, "linear_top1": 0.95},
            "random_init": {"knn_k200": 0.85, "knn_k20": 0.9361, "linear_top1": 0.9472},
        },
    }
    lines = results_table(results).splitlines()
    assert lines[-1].startswith("gain over best baseline") and "+0.0306" in lines[-1]
    assert len({len(line) for line in lines}) == 1, lines  # every column ends at one place
    ends = [line.index("0.9639") + 6 for line in lines if "0.9639" in line]
    assert lines[-1].index("+0.0306") + 7 == ends[0]


def test_held_out_results_say_so_in_the_title():
    """`contrast eval --heldout` scores on part of train: its table must not pass for a test
    result."""
    results = {"loss": "ntxent", "metrics": {"knn_k200": 0.9}, "split": "heldout 0.2 of train"}
    first = results_table(results).splitlines()[0]
    assert first == "held-out (train): heldout 0.2 of train, not the test split"
    assert "held-out" not in results_table({**results, "split": "test"})


def test_a_sweep_plot_only_for_the_jobs_of_one_sweep(tmp_path):
    """`contrast plot` over runs of different sweeps, or of none, draws no sweep.png (its
    winner would be a run the axis cannot name); one sweep's jobs do."""
    from contrastive_cli.plots import one_sweep
    from contrastive_cli.rundirs import Run

    sweep = tmp_path / "multirun" / "2026-12-05" / "10-00-00"
    sweep.mkdir(parents=True)
    (sweep / "multirun.yaml").write_text("{}\n")
    jobs = [Run(path=sweep / f"{i}_ntxent_digits") for i in range(2)]
    assert one_sweep(jobs)
    other = Run(path=tmp_path / "multirun" / "2026-12-05" / "11-00-00" / "0_moco_digits")
    assert not one_sweep([*jobs, other])
    single = [Run(path=tmp_path / "outputs" / "2026-12-05" / n) for n in ("a_x", "b_y")]
    assert not one_sweep(single)

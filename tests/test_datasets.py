"""data/datasets.py: the fixed stratified subsets behind ``data.train_images`` and
``data.test_images``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from contrastive_cli.data.datasets import ImageData, Split, capped, stratified_pick
from contrastive_cli.parts import load_data
from tests.conftest import TINY, read_results, run_cli


def _split(labels: list[int], offset: int = 0) -> Split:
    n = len(labels)
    images = (torch.arange(n) + offset).remainder(256).to(torch.uint8).view(n, 1, 1, 1)
    return Split(images.expand(n, 1, 2, 2).contiguous(), torch.tensor(labels))


@pytest.mark.parametrize("count", [1, 7, 10, 33, 99, 100])
def test_stratified_pick_takes_exactly_count_in_proportion(count):
    labels = np.array([0] * 50 + [1] * 30 + [2] * 20)
    mask = stratified_pick(labels, count, seed=0)
    assert mask.sum() == count
    for c, size in ((0, 50), (1, 30), (2, 20)):  # each class within one of its share
        assert abs(mask[labels == c].sum() - count * size / 100) < 1


def test_capped_train_is_a_fixed_stratified_subset_and_pretrain_stays_train():
    train = _split([0] * 60 + [1] * 40)
    data = ImageData(pretrain=train, train=train, test=_split([0, 1] * 20, 100), num_classes=2)
    small = capped(data, train=10, test=None)
    assert small.pretrain is small.train  # pretraining on train stays pretraining on train
    assert len(small.train) == 10 and small.test is data.test
    assert small.train.labels.tolist().count(0) == 6  # 60% of the images, 60% of the subset
    again = capped(data, train=10, test=None)  # the same images every time (seed 0)
    assert torch.equal(small.train.images, again.train.images)
    kept = small.train.images[:, 0, 0, 0].long()
    assert torch.equal(kept, kept.sort().values)  # in the split's own order
    assert set(kept.tolist()) <= set(range(100))


def test_capped_test_and_an_unlabelled_pretrain_split():
    unlabelled = Split(torch.zeros(30, 1, 2, 2, dtype=torch.uint8))
    data = ImageData(
        pretrain=unlabelled, train=_split([0, 1] * 10), test=_split([0, 1] * 10), num_classes=2
    )
    small = capped(data, train=8, test=4)
    assert (len(small.pretrain), len(small.train), len(small.test)) == (8, 8, 4)
    assert small.test.labels.tolist().count(1) == 2
    assert capped(data, train=None, test=None) is data
    assert capped(data, train=1000, test=1000).train is data.train  # a cap above the size: all


def test_the_config_caps_what_a_run_loads(compose_cfg):
    full = load_data(compose_cfg())
    small = load_data(compose_cfg("data.train_images=200", "data.test_images=50"))
    assert (len(small.train), len(small.test)) == (200, 50)
    assert small.pretrain is small.train and len(full.train) == 1437
    whole = {bytes(img.numpy()) for img in full.test.images}
    assert all(bytes(img.numpy()) in whole for img in small.test.images)  # a subset of test


def test_a_capped_run_trains_and_is_scored_on_the_subsets_and_says_so(tmp_path):
    caps = ["data.train_images=300", "data.test_images=100", "eval.metrics=[knn]"]
    run_cli(
        [
            "train",
            *TINY,
            *caps,
            "trainer.epochs=1",
            "eval.plots=false",
            f"hydra.run.dir={tmp_path}/r",
        ],
        cwd=tmp_path,
        check=True,
    )
    results = read_results(tmp_path / "r")
    assert results["images"] == {"train": 300, "test": 100}
    assert results["steps"] == 300 // 64  # one epoch over the capped train split
    assert set(results["baselines"]) == {"raw_pixels", "random_init"}

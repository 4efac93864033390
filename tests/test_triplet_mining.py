"""Triplet mining on a hand-built batch whose distances are known: the loss each mining
strategy returns is worked out here by naming the negative it must pick for every anchor."""

from __future__ import annotations

import math

import pytest
import torch

from contrastive_cli.losses import triplet_loss

# Points on the unit circle (degrees) and their ids. Squared distance of unit vectors
# depends only on the angle between them: d = 2 - 2 cos(angle), increasing up to 180°.
#   row:    0    1    2    3    4
ANGLES = [0, 50, 20, 75, 95]
IDS = [0, 0, 1, 1, 2]  # row 4 has no positive: it is only ever a negative
MARGIN = 0.5


def d(angle: float) -> float:
    return 2 - 2 * math.cos(math.radians(angle))


def relu(x: float) -> float:
    return max(0.0, x)


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    rad = torch.tensor(ANGLES, dtype=torch.float64).deg2rad()
    radius = torch.tensor([1.0, 2.0, 0.5, 3.0, 1.5], dtype=torch.float64)  # norms do not matter
    return torch.stack([rad.cos(), rad.sin()], 1) * radius[:, None], torch.tensor(IDS)


def test_hard_mining_takes_the_farthest_positive_and_nearest_negative():
    # anchor 0: positive 1 (50°); negatives 2 (20°), 3 (75°), 4 (95°) -> nearest is 2
    # anchor 1: positive 0 (50°); negatives 2 (30°), 3 (25°), 4 (45°) -> nearest is 3
    # anchor 2: positive 3 (55°); negatives 0 (20°), 1 (30°), 4 (75°) -> nearest is 0
    # anchor 3: positive 2 (55°); negatives 0 (75°), 1 (25°), 4 (20°) -> nearest is 4
    expected = (
        relu(d(50) - d(20) + MARGIN)
        + relu(d(50) - d(25) + MARGIN)
        + relu(d(55) - d(20) + MARGIN)
        + relu(d(55) - d(20) + MARGIN)
    ) / 4
    e, ids = batch()
    assert triplet_loss(e, ids, MARGIN, "hard").item() == pytest.approx(expected, rel=1e-12)


def test_hard_mining_takes_the_farthest_of_several_positives():
    # ids 0,0,0 at 0°, 10°, 40° and one negative at 60°: anchor 0's hardest positive is 40°.
    rad = torch.tensor([0.0, 10.0, 40.0, 60.0], dtype=torch.float64).deg2rad()
    e = torch.stack([rad.cos(), rad.sin()], 1)
    ids = torch.tensor([0, 0, 0, 1])
    expected = (
        relu(d(40) - d(60) + MARGIN)  # anchor 0: positive 40°, negative 60°
        + relu(d(30) - d(50) + MARGIN)  # anchor 1 (10°): positive 40° (30), negative 50
        + relu(d(40) - d(20) + MARGIN)  # anchor 2 (40°): positive 0° (40), negative 20
    ) / 3  # row 3 has no positive
    assert triplet_loss(e, ids, MARGIN, "hard").item() == pytest.approx(expected, rel=1e-12)


def test_semihard_mining_takes_the_nearest_negative_farther_than_the_positive():
    # (0, 1): d_ap = d(50); negatives farther: 3 (75°), 4 (95°)   -> 3
    # (1, 0): d_ap = d(50); none farther (30°, 25°, 45°)          -> farthest, 4 (45°)
    # (2, 3): d_ap = d(55); farther: 4 (75°)                       -> 4
    # (3, 2): d_ap = d(55); farther: 0 (75°)                       -> 0
    expected = (
        relu(d(50) - d(75) + MARGIN)
        + relu(d(50) - d(45) + MARGIN)
        + relu(d(55) - d(75) + MARGIN)
        + relu(d(55) - d(75) + MARGIN)
    ) / 4
    e, ids = batch()
    got = triplet_loss(e, ids, MARGIN, "semihard").item()
    assert got == pytest.approx(expected, rel=1e-12)
    # The fallback matters here: taking the nearest negative for (1, 0) would give more.
    assert got != pytest.approx((relu(d(50) - d(25) + MARGIN)) / 4, rel=1e-6)


def test_all_mining_averages_every_valid_triplet():
    negatives = {  # anchor: (d_ap angle, [d_an angles])
        0: (50, [20, 75, 95]),
        1: (50, [30, 25, 45]),
        2: (55, [20, 30, 75]),
        3: (55, [75, 25, 20]),
    }
    terms = [relu(d(ap) - d(an) + MARGIN) for ap, ans in negatives.values() for an in ans]
    e, ids = batch()
    assert triplet_loss(e, ids, MARGIN, "all").item() == pytest.approx(sum(terms) / 12, rel=1e-12)


def test_the_three_strategies_differ_on_this_batch():
    e, ids = batch()
    values = {m: triplet_loss(e, ids, MARGIN, m).item() for m in ("hard", "semihard", "all")}
    assert values["hard"] > values["all"] > values["semihard"] > 0

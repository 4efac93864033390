"""Low-shot linear probes: the linear probe (``eval.probe``) trained on a fraction of the
labelled train split per class (``eval.lowshot``, default 1% and 10%; at least one image of
each class), tested on the whole test split. Each fraction is the mean and standard deviation
over ``eval.lowshot_draws`` stratified draws fixed by the seed: ``lowshot_1pct`` and
``lowshot_1pct_std``. The probe's weight decay is chosen from ``eval.lowshot_weight_decays``
on a held-out part of the draw; the test split chooses nothing.

Speed: the grid is the probe's strongest three decays (on Fashion-MNIST the weaker ones cost
two thirds of the fits' time and, chosen on the 60 held-out images of a 1% draw, tested
lower), and each draw's first fit starts from the previous draw's (``linear_probe``'s
``start``: the same objective, a nearer starting point)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from contrastive_cli.data.batches import derive_seed
from contrastive_cli.evaluate import WHITEN_MAX_DIM, linear_probe
from contrastive_cli.evaluators.base import Features

WEIGHT_DECAYS = (1e-4, 1e-3, 1e-2)  # eval.lowshot_weight_decays where a config has none
# A draw of fewer than this many images per feature is fitted on standardised features, not
# whitened ones: with few images the covariance's small eigenvalues make the whitened basis's
# L2 term ill-conditioned. Fashion-MNIST, 256-d cnn features: 197 against 342 L-BFGS
# evaluations over the grid at 540 images (2 per feature), 344 against 213 at 5,400 (21).
WHITEN_MIN_ROWS_PER_DIM = 10


def lowshot_key(fraction: float) -> str:
    """0.01 -> 'lowshot_1pct', 0.1 -> 'lowshot_10pct', 0.005 -> 'lowshot_0.5pct'."""
    return f"lowshot_{round(fraction * 100, 6):g}pct"


def stratified_draw(labels: Tensor, fraction: float, seed: int, draw: int) -> Tensor:
    """Indices into ``labels`` (the train split's): max(1, round(fraction * n_c)) images of
    each class c, drawn with a generator fixed by (seed, fraction, draw); sorted."""
    g = torch.Generator().manual_seed(derive_seed(seed, "lowshot", float(fraction), draw))
    labels = labels.cpu()
    chosen = []
    for c in torch.unique(labels).tolist():
        members = (labels == c).nonzero().flatten()
        n = max(1, round(fraction * len(members)))
        chosen.append(members[torch.randperm(len(members), generator=g)[:n]])
    return torch.cat(chosen).sort().values


class LowShot:
    name = "lowshot"
    needs_labels = True

    def __init__(self, fractions: Sequence[float], draws: int, probe: dict, seed: int):
        self.fractions, self.draws = [float(f) for f in fractions], int(draws)
        self.probe, self.seed = dict(probe), seed

    def __call__(self, f: Features) -> dict[str, float]:
        assert f.train_x is not None and f.train_y is not None
        assert f.test_x is not None and f.test_y is not None
        metrics: dict[str, float] = {}
        start = None  # warm start: the previous draw's first fit
        for fraction in self.fractions:
            scores = []
            for draw in range(self.draws):
                idx = stratified_draw(f.train_y, fraction, self.seed, draw).to(f.train_x.device)
                result = linear_probe(
                    f.train_x[idx],
                    f.train_y[idx],
                    f.test_x,
                    f.test_y,
                    f.num_classes,
                    seed=derive_seed(self.seed, "lowshot-probe", draw),
                    start=start,
                    whiten=len(idx) >= WHITEN_MIN_ROWS_PER_DIM * f.train_x.shape[1]
                    and f.train_x.shape[1] <= WHITEN_MAX_DIM,
                    **self.probe,
                )
                start = result.first
                scores.append(result.top1)
            key = lowshot_key(fraction)
            metrics[key] = statistics.fmean(scores)
            metrics[f"{key}_std"] = statistics.stdev(scores) if len(scores) > 1 else 0.0
        return metrics


def make(settings: dict[str, Any], seed: int) -> LowShot:
    """From the ``eval`` section: ``eval.lowshot``, ``eval.lowshot_draws``, ``eval.probe``
    with ``eval.lowshot_weight_decays`` for its grid."""
    grid = settings.get("lowshot_weight_decays") or WEIGHT_DECAYS
    return LowShot(
        settings.get("lowshot", [0.01, 0.1]),
        settings.get("lowshot_draws", 3),
        {**settings["probe"], "weight_decays": [float(w) for w in grid]},
        seed,
    )

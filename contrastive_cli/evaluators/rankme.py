"""RankMe (Garrido et al. 2023): the effective rank of the encoder's features of the
label-free sample (``rankme``), and of the method's projector output where it has one
(``rankme_projector``, the trained encoder only). No labels."""

from __future__ import annotations

from typing import Any

from contrastive_cli.evaluators.base import Features
from contrastive_cli.labelfree import rankme


class RankMe:
    name = "rankme"
    needs_labels = False
    needs_sample = True

    def __call__(self, f: Features) -> dict[str, float]:
        assert f.sample is not None
        metrics = {"rankme": rankme(f.sample.clean)}
        if f.sample.projected is not None:
            metrics["rankme_projector"] = rankme(f.sample.projected)
        return metrics


def make(settings: dict[str, Any], seed: int) -> RankMe:
    return RankMe()

"""Retrieval: test queries against the train split, cosine similarity of the features.

- ``recall_at_1``, ``recall_at_5``: the fraction of queries with at least one image of their
  class among their k nearest train images (Recall@K of the metric-learning literature).
- ``map_at_r`` (Musgrave et al. 2020): with R the number of train images of the query's class,
  AP@R = (1/R) sum_{i<=R} P@i * rel(i) over the query's R nearest train images, averaged over
  the queries.

Queries: up to ``eval.retrieval_queries`` test images (a fixed sample; all of them when null);
the database is the whole train split. The queries never choose anything.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from contrastive_cli.data.batches import derive_seed
from contrastive_cli.evaluators.base import Features

KS = (1, 5)
QUERIES = 500  # eval.retrieval_queries where a config has none (was 1000: see the README)


@torch.no_grad()
def retrieval_metrics(
    bank: Tensor, bank_y: Tensor, queries: Tensor, query_y: Tensor, chunk: int = 256
) -> dict[str, float]:
    """recall_at_1, recall_at_5 and map_at_r of ``queries`` against ``bank`` (cosine)."""
    bank = F.normalize(bank.float(), dim=1)
    queries = F.normalize(queries.float(), dim=1)
    counts = torch.bincount(bank_y, minlength=int(max(bank_y.max(), query_y.max())) + 1)
    r_max = int(counts.max())
    depth = min(max(r_max, max(KS)), len(bank))
    hits = {k: 0.0 for k in KS}
    ap_sum = 0.0
    ranks = torch.arange(1, depth + 1, device=bank.device, dtype=torch.float32)
    buffer = bank.new_empty(min(chunk, len(queries)), len(bank))  # reused: no page faults
    for start in range(0, len(queries), chunk):
        q, y = queries[start : start + chunk], query_y[start : start + chunk]
        sim = torch.mm(q, bank.T, out=buffer[: len(q)])
        # the depth nearest, then ordered: cheaper than a sorted topk (~30% on CPU)
        top, idx = sim.topk(depth, dim=1, sorted=False)
        idx = idx.gather(1, top.argsort(dim=1, descending=True))  # (m, depth), nearest first
        rel = (bank_y[idx] == y[:, None]).float()
        for k in KS:
            hits[k] += float(rel[:, :k].amax(1).sum())
        r = counts[y].float()  # (m,)
        within = (ranks[None] <= r[:, None]).float()
        precision = rel.cumsum(1) / ranks
        ap = (precision * rel * within).sum(1) / r.clamp_min(1)
        ap_sum += float(ap.sum())
    n = len(queries)
    return {"recall_at_1": hits[1] / n, "recall_at_5": hits[5] / n, "map_at_r": ap_sum / n}


class Retrieval:
    name = "retrieval"
    needs_labels = True

    def __init__(self, queries: int | None, seed: int):
        self.queries, self.seed = queries, seed

    def __call__(self, f: Features) -> dict[str, float]:
        assert f.train_x is not None and f.test_x is not None
        assert f.train_y is not None and f.test_y is not None
        test_x, test_y = f.test_x, f.test_y
        if self.queries is not None and self.queries < len(test_x):
            g = torch.Generator().manual_seed(derive_seed(0, "retrieval-queries"))
            idx = torch.randperm(len(test_x), generator=g)[: self.queries].to(test_x.device)
            test_x, test_y = test_x[idx], test_y[idx]
        return retrieval_metrics(f.train_x, f.train_y, test_x, test_y)


def make(settings: dict[str, Any], seed: int) -> Retrieval:
    """From the ``eval`` section: ``eval.retrieval_queries`` (null: every test image)."""
    queries = settings.get("retrieval_queries", QUERIES)
    return Retrieval(None if queries is None else int(queries), seed)

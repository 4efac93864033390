"""metrics.jsonl: the epoch's record, one line per epoch (rank 0 only)."""

from __future__ import annotations

from typing import Any

from contrastive_cli.events import Callback, Loop
from contrastive_cli.report import MetricsLog


class MetricsFile(Callback):
    def __init__(self, metrics_log: MetricsLog):
        self.metrics_log = metrics_log

    def epoch_end(self, loop: Loop, record: dict[str, Any]) -> None:
        self.metrics_log.append(record)

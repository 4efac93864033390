"""TensorBoard: event files in ``<run_dir>/tensorboard/``, so ``tensorboard --logdir outputs``
shows every run and sweep job side by side.

Scalars, against the optimizer step, named so that TensorBoard (which sorts cards by name)
opens on the loss and the monitor: ``epoch/loss`` and ``epoch/monitor_knn`` per epoch,
``final/<metric>`` at the end (one point per run: runs compare there),
``train/images_per_s`` per epoch and ``train/loss``, ``train/lr`` every ``trainer.log_every``
steps. The baselines are one text card, ``results``: each metric of the trained encoder beside
raw pixels' and the random-init encoder's (not a one-point card per baseline and metric). The projector gets
the test features of the embedding map (``eval.embedding_points`` images) with their labels
and thumbnails. A resumed run drops the events its previous attempt logged after the
checkpoint (TensorBoard's ``purge_step``), so curves do not fold back on themselves.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from contrastive_cli.tracking import (
    EmbeddingSample,
    is_number,
    require,
    restart_line,
    results_markdown,
)

SUBDIR = "tensorboard"


class TensorboardTracker:
    name = "tensorboard"

    def __init__(self, projector: bool = True):
        require("tensorboard", self.name)
        self.projector = projector
        self.writer: Any = None
        self.logdir: Path | None = None
        self.resumed = False
        self.config_text = ""

    def start(
        self, run_dir: Path, config: dict[str, Any], choices: dict[str, str], resumed: bool
    ) -> None:
        import yaml
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401  (import now, not mid-training)

        from contrastive_cli.writer import safe_path

        self.logdir = safe_path(run_dir, SUBDIR, create=False)  # never written through a link
        self.resumed = resumed
        logging.getLogger(__name__).info(
            f"TensorBoard: events go to {self.logdir}; see them with: "
            f"tensorboard --logdir '{run_dir.parent}'"
        )
        self.config_text = "```\n" + yaml.safe_dump(config, sort_keys=False) + "```"

    def _writer(self, step: int) -> Any:
        """The writer, opened at the first event (a resumed run's first step is its purge step)."""
        if self.writer is None:
            from torch.utils.tensorboard import SummaryWriter

            assert self.logdir is not None, "start() first"
            self.writer = SummaryWriter(str(self.logdir), purge_step=step if self.resumed else None)
            if not self.resumed:
                self.writer.add_text("config", self.config_text, 0)
        return self.writer

    def log_step(self, step: int, values: dict[str, float]) -> None:
        writer = self._writer(step)
        for key, value in values.items():
            writer.add_scalar(f"train/{key}", value, step)

    def log_epoch(self, record: dict[str, Any]) -> None:
        step = int(record["step"])
        writer = self._writer(step)
        writer.add_scalar("epoch/loss", record["loss"], step)
        if record.get("knn") is not None:
            writer.add_scalar("epoch/monitor_knn", record["knn"], step)
        writer.add_scalar("train/images_per_s", record["images_per_s"], step)
        for key in ("rankme", "rankme_projector", "alignment", "uniformity"):
            if record.get(key) is not None:  # the monitor's label-free metrics
                writer.add_scalar(f"epoch/monitor_{key}", record[key], step)

    def log_embedding(self, sample: EmbeddingSample, step: int) -> None:
        """The projector: features, labels (and class names) and thumbnails in [0, 1]."""
        if not self.projector:
            return
        labels = [int(v) for v in sample.labels.tolist()]
        metadata: list[Any] = labels
        header = None
        if sample.class_names:
            metadata = [[label, sample.class_names[label]] for label in labels]
            header = ["label", "class"]
        self._writer(step).add_embedding(
            sample.features.float(),
            metadata=metadata,
            label_img=sample.images.float() / 255.0,
            global_step=step,
            tag="test_features",
            metadata_header=header,
        )

    def finish(self, status: str, results: dict[str, Any], run_dir: Path) -> None:
        step = int(results.get("steps") or 0)
        writer = self._writer(step)
        for key, value in (results.get("metrics") or {}).items():
            if is_number(value):
                writer.add_scalar(f"final/{key}", value, step)
        if table := results_markdown(results):
            writer.add_text("results", table, step)
        if results.get("restarts"):  # elastic restarts of a group of processes
            lines = [restart_line(r) for r in results["restarts"]]
            writer.add_text("restarts", "\n\n".join(lines), step)
        writer.add_text(
            "status", status + (f": {results['error']}" if results.get("error") else ""), step
        )
        self.close()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None

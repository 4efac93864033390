"""The run directory's files, written only through ``RunFiles``."""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from safetensors.torch import save_file

from contrastive_cli import writer
from contrastive_cli.report import MetricsLog

CHECKPOINT = Path("checkpoints") / "last.pt"


# --------------------------------------------------------------------------- the run directory
class RunFiles:
    """The run directory's files, written only through here: no write follows a symbolic
    link (see ``contrastive_cli.writer``), whole files are replaced atomically."""

    # Everything a run writes, checked for links before the run starts (not after training).
    NAMES = (
        "train.log",
        "metrics.jsonl",
        "results.json",
        "encoder.safetensors",
        "checkpoints/last.pt",
        "checkpoints/prev.pt",
        "plots/curves.png",
        "plots/embedding.png",
    )

    def __init__(self, path: Path, writes: bool = True):
        self.path = path
        self.writes = writes  # only one process of several writes the run directory
        for name in self.NAMES:
            writer.check_file(writer.safe_path(path, name, create=False))

    def file(self, relative: str | Path) -> Path:
        return writer.safe_path(self.path, relative, create=self.writes)

    @contextlib.contextmanager
    def logging_to_train_log(self) -> Iterator[None]:
        if not self.writes:
            yield
            return
        with writer.logging_to(self.file("train.log"), logging.INFO):
            yield

    def metrics(self, keep_epochs: int) -> MetricsLog | None:
        return MetricsLog(self.file("metrics.jsonl"), keep_epochs) if self.writes else None

    def config(self, cfg: DictConfig) -> None:
        """Rewrite the saved config (resolved) with ``cfg``'s values."""
        if self.writes and (self.path / ".hydra" / "config.yaml").exists():
            from contrastive_cli.rebuild import saved_config

            writer.write_text_atomic(self.file(Path(".hydra") / "config.yaml"), saved_config(cfg))

    def results(self, results: dict[str, Any]) -> None:
        if self.writes:
            writer.write_json(self.file("results.json"), results)

    def read_status(self) -> str | None:
        from contrastive_cli.rundirs import read_results

        results, _ = read_results(self.path / "results.json")
        return None if results is None else results.get("status")

    def checkpoint(self) -> Path:
        return self.file(CHECKPOINT)

    def encoder(self, encoder: torch.nn.Module, metadata: dict[str, str]) -> None:
        path = self.file("encoder.safetensors")
        fd, tmp = tempfile.mkstemp(prefix=".encoder.", suffix=".tmp", dir=self.path)
        os.close(fd)
        try:
            tensors = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
            save_file(tensors, tmp, metadata=metadata)
            os.chmod(tmp, writer.FILE_MODE)
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

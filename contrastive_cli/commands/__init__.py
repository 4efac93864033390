"""One module per ``contrast`` subcommand, each exposing ``HELP`` and ``main(args) -> int``."""

from __future__ import annotations

import argparse

from contrastive_cli.errors import ConfigError


class Parser(argparse.ArgumentParser):
    """A subcommand's parser whose usage errors are one line (``ConfigError``, exit 2)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(f"{self.prog}: {message} (see {self.prog} --help)")

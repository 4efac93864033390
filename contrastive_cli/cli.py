"""The ``contrast`` command: a thin dispatcher over the modules in ``commands/``."""

from __future__ import annotations

import importlib
import logging
import os
import sys

import contrastive_cli
from contrastive_cli.config import OVERLAYS, config_groups
from contrastive_cli.errors import UserError, error_lines
from contrastive_cli.untrusted import printable

# name -> module under contrastive_cli.commands; each has HELP and main(args) -> exit code.
COMMANDS = ["train", "runs", "resume", "reproduce", "eval", "plot", "embed", "export"]


def _command(name: str):
    return importlib.import_module(f"contrastive_cli.commands.{name}")


def usage() -> str:
    lines = [
        f"contrast {contrastive_cli.__version__}: contrastive self-supervised learning from the command line",
        "",
        "usage: contrast <command> [arguments]   (contrast <command> --help for more)",
        "",
        "commands:",
    ]
    lines += [f"  {name:<10} {_command(name).HELP}" for name in COMMANDS]
    lines += ["", "config groups for `contrast train` (group=option):"]
    lines += [f"  {group:<12} {', '.join(options)}" for group, options in config_groups().items()]
    lines += [
        f"  +{group:<11} {', '.join(options)}  (a whole recipe on top: +{group}=<option>)"
        for group, options in config_groups(overlays=True).items()
        if group in OVERLAYS
    ]
    lines += [
        "",
        "examples:",
        "  contrast train                                  digits (ships with scikit-learn), offline",
        "  contrast train loss=ntxent data=mnist",
        "  contrast train loss=moco data=fashion_mnist encoder=cnn trainer.epochs=20",
        f"  contrast train -m loss={','.join(config_groups()['loss'])}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    try:
        return _main(argv)
    except BrokenPipeError:  # `contrast runs | head`: the reader left; not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def _main(argv: list[str] | None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    # A file name that is not UTF-8 (a surrogate in Python's str) is printed as \xNN
    # rather than failing the print or the log line that names it.
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if args[0] in ("-V", "--version"):
        print(f"contrast {contrastive_cli.__version__}")
        return 0
    if args[0] not in COMMANDS:
        print(
            f"error: unknown command {args[0]!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr
        )
        return 2
    if args[0] != "train":  # Hydra configures logging for train; the others log plainly to stdout
        logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    try:
        return _command(args[0]).main(args[1:])
    except UserError as e:  # it may quote a run file: shown without control characters
        for line in error_lines(e):
            print(f"error: {printable(line)}", file=sys.stderr)
        return e.exit_code

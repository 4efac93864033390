"""One module per ``contrast`` subcommand, each exposing ``HELP`` and ``main(args) -> int``."""

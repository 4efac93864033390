"""contrast: a command-line experiment runner for contrastive self-supervised learning."""

__version__ = "0.1.0"
# The name on PyPI (``pip install contrastive-cli``; ``contrast`` there is someone else's
# project). The command stays ``contrast``, the import ``contrastive_cli``.
DISTRIBUTION = "contrastive-cli"


def install_hint(extra: str) -> str:
    """The pip command that installs one of our optional extras (tracking, sweep, parquet)."""
    return f"pip install '{DISTRIBUTION}[{extra}]'"

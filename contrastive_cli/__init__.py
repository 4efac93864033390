"""contrast: a command-line experiment runner for contrastive self-supervised learning."""

__version__ = "0.1.0"

"""Where the package's own configs are, and which groups and options they ship.

A leaf module (it imports nothing of contrast's), so that ``config`` and ``safety`` can both
read the shipped configs without importing each other.
"""

from __future__ import annotations

from pathlib import Path


def config_dir() -> Path:
    """``contrastive_cli/conf`` in an installed wheel, the top-level ``conf/`` in a checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate
    raise FileNotFoundError(
        f"contrast's configs are missing: looked in {here / 'conf'} and {here.parent / 'conf'}"
    )


CONF_DIR = config_dir()
OVERLAYS = ("experiment",)  # groups in no defaults list: applied with +experiment=<option>


def config_groups(overlays: bool = False) -> dict[str, list[str]]:
    """{group: [options]} from the config folder, nested groups as ``data/augment``; Hydra's
    own settings and files starting with ``_`` (bases other options extend) excluded, and
    the overlay groups (``+experiment=``) unless ``overlays``."""
    groups = {}
    for d in sorted(CONF_DIR.rglob("*")):
        name = d.relative_to(CONF_DIR).as_posix()
        if name in OVERLAYS and not overlays:
            continue
        if d.is_dir() and not name.startswith(("hydra", "_")):
            options = sorted(p.stem for p in d.glob("*.yaml") if not p.stem.startswith("_"))
            if options:
                groups[name] = options
    return groups

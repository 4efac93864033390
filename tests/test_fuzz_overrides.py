"""Property: any command line either gives a config that validates and builds, or one clear
error line (a UserError, which the CLI prints as `error: ...`); never another exception."""

from __future__ import annotations

import string

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from omegaconf import OmegaConf, open_dict

from contrastive_cli.command_line import check_command_line
from contrastive_cli.config import compose, config_groups
from contrastive_cli.errors import UserError


def _flat(node: object, prefix: str = "") -> dict[str, object]:
    if isinstance(node, dict):
        return {
            k: v for key, child in node.items() for k, v in _flat(child, f"{prefix}{key}.").items()
        }
    return {prefix[:-1]: node}


def _real_settings() -> dict[str, object]:
    """Every key of every shipped option -> its default value."""
    found: dict[str, object] = {}
    for group, options in config_groups().items():
        for option in options:
            cfg = compose([f"{group}={option}"])
            with open_dict(cfg):
                cfg.pop("hydra", None)
            found.update(_flat(OmegaConf.to_container(cfg, resolve=True)))
    return dict(sorted(found.items()))


DEFAULTS = _real_settings()
KEYS = list(DEFAULTS)
GROUPS = config_groups()


def render(value: object) -> str:
    """A Python value as override text."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, list):
        return "[" + ",".join(render(v) for v in value) + "]"
    if isinstance(value, str):
        return (
            value
            if value.replace("_", "").replace(".", "").isalnum()
            else "'" + value.replace("'", "") + "'"
        )
    return repr(value)


def plausible(key: str) -> st.SearchStrategy[str]:
    """Values of the default's type near the default: these mostly validate."""
    default = DEFAULTS[key]
    if isinstance(default, bool):
        values: st.SearchStrategy = st.booleans()
    elif isinstance(default, int):
        values = st.integers(0, 2 * default + 2)
    elif isinstance(default, float):
        values = st.floats(0, 2 * default + 0.1)
    else:
        values = st.just(default)
    return values.map(render)


garbage_key = st.from_regex(r"[a-z_]{1,8}(\.[a-z_]{1,8}){0,2}", fullmatch=True)
number_text = st.one_of(
    st.integers(-1000, 100_000).map(str),
    st.floats(allow_nan=True, allow_infinity=True, width=32).map(
        lambda f: repr(float(f)).replace("e+", "e")
    ),
)
value_text = st.one_of(
    number_text,
    st.sampled_from(["true", "false", "null", "''", "[]", "{}", "???"]),
    st.text(alphabet=string.ascii_letters + string.digits + "_-./:,[]{}'\"$ =\\", max_size=12),
    st.lists(number_text, max_size=4).map(lambda xs: "[" + ",".join(xs) + "]"),
    st.sampled_from(KEYS).map(lambda k: "${" + k + "}"),
)


@st.composite
def override(draw: st.DrawFn) -> str:
    kind = draw(st.sampled_from(["key", "key", "key", "group", "garbage"]))
    if kind == "group":
        group = draw(st.sampled_from(sorted(GROUPS)))
        option = draw(st.one_of(st.sampled_from(GROUPS[group]), value_text))
        return f"{group}={option}"
    if kind == "key":
        key = draw(st.sampled_from(KEYS))
        value = draw(st.one_of(plausible(key), value_text))
    else:
        key, value = draw(garbage_key), draw(value_text)
    prefix = draw(st.sampled_from(["", "", "", "", "", "+", "++", "~"]))
    if prefix == "~" and draw(st.booleans()):
        return f"~{key}"
    return f"{prefix}{key}={value}"


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(overrides=st.lists(override(), min_size=1, max_size=3), multirun=st.booleans())
def test_any_command_line_validates_or_fails_in_one_line(overrides, multirun):
    args = (["-m"] if multirun else []) + overrides
    try:
        check_command_line(args)
    except UserError as e:
        message = str(e)
        assert message.strip() and "\n" not in message, repr(message)
        event(f"refused: {type(e).__name__}")
        return
    event("accepted")
    if multirun:
        return
    cfg = compose(overrides)
    if cfg.data.name == "digits":  # a run would start: the data loads and fits the config
        from contrastive_cli.parts import load_data
        from contrastive_cli.validate import check_data

        with open_dict(cfg):
            cfg.pop("hydra", None)
        try:
            check_data(cfg, load_data(cfg))
        except UserError as e:
            assert "\n" not in str(e)

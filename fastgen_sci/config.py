"""Checks command-line overrides before Hydra runs, so a bad one is one clear line, not a traceback."""
from __future__ import annotations

import re

from omegaconf import OmegaConf

from . import registry

GROUPS = {"domain": registry.domains, "method": registry.methods}


class OverrideError(ValueError):
    """An override that names an unknown group option or key."""


def compose(overrides: list[str]):
    """The composed config (without Hydra's own node) for these overrides."""
    from hydra import compose as hydra_compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="fastgen_sci.configs", version_base="1.3"):
        return hydra_compose(config_name="config", overrides=overrides)


def check_overrides(overrides: list[str]) -> None:
    """Raise cli.UserError naming the bad override and the valid choices."""
    from .cli import UserError

    try:
        lines = _first_choices(_parse(overrides))
    except OverrideError as e:
        raise UserError(str(e)) from None
    try:
        cfg = compose(lines)
    except Exception as e:  # Hydra raises several exception types; all become one readable line
        raise UserError(_explain(e, lines)) from None
    try:
        _check_node_types(cfg)
    except OverrideError as e:
        raise UserError(str(e)) from None


def _check_node_types(cfg) -> None:
    """Values of domain/method/trainer/sampler nodes against the annotations of the classes they build."""
    from .samplers import SamplerSpec
    from .train import Trainer

    node = lambda key: {k: v for k, v in OmegaConf.to_container(cfg[key], resolve=True).items() if k != "name"}
    check_types(registry.load_method(cfg.method.name), node("method"), "method")
    check_types(registry.load_domain(cfg.domain.name), node("domain"), "domain")
    check_types(Trainer, node("trainer"), "trainer")
    for key in ("teacher_sampler", "student_sampler"):
        check_types(SamplerSpec, node(key) | {"name": cfg[key].name}, key)


def _parse(overrides: list[str]):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    lines = [o for o in overrides if not o.startswith("-") and not o.lstrip("+~").startswith("hydra.")]
    try:
        parsed = OverridesParser.create().parse_overrides(lines)
    except Exception as e:
        raise OverrideError(f"cannot parse overrides {lines}: {str(e).splitlines()[0]}") from None
    for o in parsed:
        if o.key_or_group in GROUPS:
            valid = GROUPS[o.key_or_group]()
            for value in _values(o):
                if value not in valid:
                    raise OverrideError(f"unknown {o.key_or_group} '{value}'; valid: {', '.join(sorted(valid))}")
    return parsed


def _values(o) -> list[str]:
    return list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]


def _first_choices(parsed) -> list[str]:
    """Each sweep replaced by its first value, enough to check that every key exists."""
    return [o.input_line.split("=", 1)[0] + "=" + _values(o)[0] if o.is_sweep_override() else o.input_line
            for o in parsed]


def _explain(e: Exception, lines: list[str]) -> str:
    msg = str(e)
    bad = re.search(r"Could not (?:override|append to) '([^']+)'", msg)
    if bad:
        key = bad.group(1)
        parent, _, leaf = key.rpartition(".")
        base = compose([line for line in lines if line.split("=", 1)[0] in GROUPS])
        node = OmegaConf.select(base, parent) if parent else base
        valid = ", ".join(sorted(node.keys())) if OmegaConf.is_dict(node) else "(none)"
        return f"unknown config key '{key}'; valid keys under '{parent or '<root>'}': {valid}"
    missing = re.search(r"Could not find '([^']+)'", msg)
    if missing:
        return f"no config file for '{missing.group(1)}' (is the pack's config package registered?)"
    return msg.strip().splitlines()[0]


def check_types(cls, kwargs: dict, where: str) -> None:
    """Raise OverrideError when a value does not fit the annotated type of `cls`'s keyword."""
    import typing

    hints = typing.get_type_hints(cls.__init__)
    for key, value in kwargs.items():
        hint = hints.get(key)
        if hint is not None and not _fits(value, hint):
            raise OverrideError(f"{where}.{key}={value!r} should be {_name(hint)}")


def _fits(value, hint) -> bool:
    import types
    import typing

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, a) for a in args)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin in (tuple, list) or hint in (tuple, list):
        return isinstance(value, (list, tuple))
    if origin is dict or hint is dict:
        return isinstance(value, dict)
    return isinstance(value, hint) if isinstance(hint, type) else True


def _name(hint) -> str:
    return getattr(hint, "__name__", str(hint).replace("typing.", ""))

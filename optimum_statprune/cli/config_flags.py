"""Command-line flags generated from the ``StatPruneConfig`` dataclass, so they never drift from it.

Every field but ``schema_version`` is a flag (``--field-name``; booleans as ``--x/--no-x``, lists take
several values, ``--ec-clamp LOW HIGH``), derived from the field's type. A field's help text and
choices come from its ``metadata`` (``help``, ``choices``), written beside the field with
``config.option``. Values come, in increasing priority, from the dataclass
defaults, ``--config FILE`` and the flags given.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..config import (
    CONFIG_NAME,
    PRESET_FIELDS,
    StatPruneConfig,
)
from ..flags import flag_for
from .errors import UsageError, one_line

CFG_PREFIX = "cfg__"
"""argparse ``dest`` prefix of the generated StatPruneConfig flags (absent unless given)."""

SKIPPED_FIELDS = frozenset({"schema_version"})
"""StatPruneConfig fields that are not flags (the schema version is the package's, not the user's)."""

_CONFIG_FIELD_RE = re.compile(r"StatPruneConfig\.(\w+)=")


def config_fields() -> list[dataclasses.Field]:
    """The StatPruneConfig fields that have a flag (all but ``schema_version``)."""
    return [f for f in dataclasses.fields(StatPruneConfig) if f.name not in SKIPPED_FIELDS]


def field_help(f: dataclasses.Field) -> str:
    """The field's ``metadata["help"]`` (``config.option``), else its qualified name."""
    return f.metadata.get("help") or f"StatPruneConfig.{f.name}"


def field_choices(f: dataclasses.Field) -> Sequence[str] | None:
    """The field's ``metadata["choices"]`` (a function of none is called: the registry's method list);
    ``None``: a free value."""
    choices = f.metadata.get("choices")
    return choices() if callable(choices) else choices


def _unwrap_optional(hint: Any) -> Any:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
    else:  # pragma: no cover - every field has a default
        return "required"
    if value is None:
        return "the method's preset" if f.name in PRESET_FIELDS else "all"
    if isinstance(value, tuple):
        return " ".join(str(v) for v in value)
    if isinstance(value, list):
        return " ".join(value) if value else "none"
    return str(value)


def field_argument_kwargs(f: dataclasses.Field, hint: Any) -> dict[str, Any]:
    """argparse keyword arguments for one StatPruneConfig field, derived from its type."""
    base = _unwrap_optional(hint)
    kwargs: dict[str, Any] = {"dest": CFG_PREFIX + f.name, "default": argparse.SUPPRESS}
    help_text = field_help(f)
    choices = field_choices(f)
    if choices:
        help_text += f"; one of {', '.join(choices)}"
    help_text += f" (default: {_default_text(f)})"
    kwargs["help"] = help_text.replace("%", "%%")
    origin, args = typing.get_origin(base), typing.get_args(base)
    if base is bool:
        kwargs["action"] = argparse.BooleanOptionalAction
    elif base in (int, float, str):
        kwargs["type"] = base
        kwargs["metavar"] = {int: "N", float: "X", str: "NAME"}[base]
        if f.name == "pattern":
            kwargs["metavar"] = "PATTERN"
    elif origin is tuple and args and all(a in (int, float) for a in args):
        kwargs["nargs"] = len(args)
        kwargs["type"] = args[0]
        kwargs["metavar"] = ("LOW", "HIGH") if len(args) == 2 else tuple(f"X{i}" for i in range(len(args)))
    elif origin is list and args == (str,):
        kwargs["nargs"] = "+"
        kwargs["metavar"] = "REGEX"
    else:
        raise TypeError(
            f"StatPruneConfig.{f.name} has type {hint!r}, which has no command-line mapping; "
            "teach optimum_statprune.cli.config_flags.field_argument_kwargs about it."
        )
    return kwargs


def add_config_arguments(parser: argparse.ArgumentParser, exclude: Sequence[str] = ()) -> None:
    """One flag per StatPruneConfig field (except ``exclude``), plus ``--config FILE``."""
    group = parser.add_argument_group(
        "pruning configuration",
        "StatPruneConfig fields; a flag overrides the same field read from --config.",
    )
    group.add_argument(
        "--config",
        dest="config_file",
        metavar="FILE",
        help=f"read the configuration from a {CONFIG_NAME} file (or a directory holding one, such as a "
        "pruned model); flags given here override its fields",
    )
    hints = typing.get_type_hints(StatPruneConfig)
    for f in config_fields():
        if f.name in exclude:
            continue
        group.add_argument(flag_for(f.name), **field_argument_kwargs(f, hints[f.name]))


def explicit_config_values(args: argparse.Namespace) -> dict[str, Any]:
    """The StatPruneConfig fields given as flags (absent flags are not in the namespace)."""
    out = {}
    for key, value in vars(args).items():
        if key.startswith(CFG_PREFIX):
            name = key[len(CFG_PREFIX) :]
            out[name] = tuple(value) if name == "ec_clamp" else value
    return out


def read_config_file(path_text: str) -> dict[str, Any]:
    """The JSON object of a config file (or of the one in a directory), as one-line usage errors."""
    path = Path(path_text).expanduser()
    if path.is_dir():
        path = path / CONFIG_NAME
    if not path.is_file():
        raise UsageError(f"--config {path_text}: no such file; give a {CONFIG_NAME} file or a directory holding one")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--config {path_text}: cannot read it ({one_line(exc)})") from exc
    except json.JSONDecodeError as exc:
        raise UsageError(f"--config {path_text}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from exc
    if not isinstance(data, dict):
        raise UsageError(f"--config {path_text}: expected a JSON object of StatPruneConfig fields, got {type(data).__name__}")
    return data


def build_config(args: argparse.Namespace, **overrides: Any) -> StatPruneConfig:
    """Dataclass defaults <- ``--config FILE`` <- flags given <- ``overrides``; validated."""
    data: dict[str, Any] = {}
    config_file = getattr(args, "config_file", None)
    if config_file:
        data.update(read_config_file(config_file))
    explicit = explicit_config_values(args)
    data.update(explicit)
    data.update(overrides)
    try:
        return StatPruneConfig.from_dict(data)
    except (ValueError, TypeError) as exc:
        raise UsageError(config_error_text(str(exc), set(explicit) | set(overrides), config_file)) from exc


def config_error_text(message: str, given: set[str], config_file: str | None) -> str:
    """``StatPruneConfig.sparsity=1.5 is not valid: ...`` -> ``--sparsity 1.5 is not valid: ...``."""
    m = _CONFIG_FIELD_RE.search(message)
    if m is None:
        where = f" (in --config {config_file})" if config_file else ""
        return one_line(message) + where
    name = m.group(1)
    rest = message[m.end() :]
    if name in given or not config_file:
        return one_line(f"{flag_for(name)} {rest}")
    return one_line(f"{name}={rest}".replace(" is not valid", f" in --config {config_file} is not valid", 1))


def describe_config(config: StatPruneConfig) -> str:
    """``wanda, 50% unstructured, row groups`` or ``wanda, 2:4``."""
    if config.nm is not None:
        return f"{config.method}, {config.pattern}"
    return f"{config.method}, {config.sparsity:.0%} unstructured, {config.group} groups"

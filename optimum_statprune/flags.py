"""How a ``StatPruneConfig`` field is spelled on the command line, in one place.

The CLI builds its flags with these functions and the model card builds its "reproduce" command with
them, so a card's command always parses with the CLI that wrote it. Config-independent on purpose:
importing it pulls in nothing else of the package."""

from __future__ import annotations

from typing import Any


def flag_for(field_name: str) -> str:
    """``ec_clamp`` -> ``--ec-clamp``."""
    return "--" + field_name.replace("_", "-")


def negated_flag_for(field_name: str) -> str:
    """``sequential`` -> ``--no-sequential`` (the ``False`` side of a boolean flag, as
    ``argparse.BooleanOptionalAction`` names it)."""
    return "--no-" + field_name.replace("_", "-")


def command_line_args(values: dict[str, Any]) -> list[str]:
    """``{"ec_clamp": [1, 2], "sequential": False, "method": "wanda"}`` ->
    ``["--ec-clamp", "1", "2", "--no-sequential", "--method", "wanda"]``: booleans as ``--x/--no-x``,
    lists as several values (an empty list is left out), ``None`` left out."""
    args: list[str] = []
    for name, value in values.items():
        if value is None:
            continue
        if isinstance(value, bool):
            args.append(flag_for(name) if value else negated_flag_for(name))
        elif isinstance(value, (list, tuple)):
            if value:
                args += [flag_for(name), *map(str, value)]
        else:
            args += [flag_for(name), str(value)]
    return args


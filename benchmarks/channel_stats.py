"""Per-channel input statistics (count, sum, sum of squares) on one micro-batch: time and accuracy of
ways to compute them from half-precision activations.

    python benchmarks/channel_stats.py --json stats.json

The engine adds every target's input to its ``ChannelStats`` on every calibration batch, so on a 7B model
this runs 4 x 16 x 32 times (Llama-2-7B, 128 x 2048 tokens in batches of 8). Each candidate is timed on
16384 tokens of the 4096- and 11008-wide inputs, and its variance and norm are compared with a float64
reference on activations built to be hard: a channel with a large mean and a small spread (cancellation in
``m2 - mean^2``), and "massive" values of 1e4 in a few tokens.
"""

from __future__ import annotations

import argparse
import json

import torch

from optimum_statprune.tensor_math.stats import ChannelStats


def hard_activations(n: int, dim: int, device: str, dtype: torch.dtype) -> torch.Tensor:
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(n, dim, device=device, generator=gen)
    x[:, 0] = 200 + 0.5 * x[:, 0]  # large mean, small spread: var / m2 ~ 6e-6
    x[:, 1] *= 1e-3  # tiny channel
    x[:7, 2] = 1e4  # massive activations in a few tokens
    return x.to(dtype)


def float64_sums(x):
    x = x.double()
    return x.sum(0), x.square().sum(0)


def float64_chunks(x):
    """The engine's path for float32 inputs (and, before, for every input): float64 copies in chunks."""
    s = torch.zeros(x.shape[-1], dtype=torch.float64, device=x.device)
    q = torch.zeros_like(s)
    for chunk in x.split(max(1, (1 << 24) // x.shape[-1])):
        chunk = chunk.to(torch.float64)
        s += chunk.sum(0)
        q += chunk.square().sum(0)
    return s, q


def engine(x):
    stats = ChannelStats(x.shape[-1], device=x.device)
    stats.update(x)
    return stats.sum, stats.sumsq


def float32_fused(x):
    return x.sum(0, dtype=torch.float32).double(), torch.linalg.vector_norm(x, dim=0, dtype=torch.float32).double().square()


def exact_square(x):
    return x.sum(0, dtype=torch.float32).double(), x.float().square().sum(0, dtype=torch.float64)


def centered_float32_copy(x):
    """Shifted by the batch's float32 mean, so the float32 sums hold the spread, not the mean: sums about the
    shift, then moved back to raw sums in float64 (where m2 - mean^2 cancels at float64 precision)."""
    n = x.shape[0]
    shift = x.sum(0, dtype=torch.float32) / n
    d = x.float() - shift
    ds, dq = d.sum(0).double(), torch.linalg.vector_norm(d, dim=0).double().square()
    shift = shift.double()
    return ds + n * shift, dq + 2 * shift * ds + n * shift.square()


def welford_batch_norm(x):
    """One read of the half-precision values: per-channel mean and variance by Welford's update in float32
    (``torch.batch_norm_stats``, CUDA only; eps 0, so the variance is ``invstd ** -2``), as raw float64 sums."""
    n = x.shape[0]
    mean, invstd = torch.batch_norm_stats(x, 0.0)
    mean, var = mean.double(), invstd.double().pow(-2)
    return n * mean, n * (var + mean.square())


def welford_float_copy(x):
    """``torch.var_mean`` on a float32 copy (it returns the input's dtype, so half inputs need the copy)."""
    n = x.shape[0]
    var, mean = torch.var_mean(x.float(), dim=0, correction=0)
    mean, var = mean.double(), var.double()
    return n * mean, n * (var + mean.square())


CANDIDATES = {"float64_chunks": float64_chunks, "engine": engine, "float32_fused": float32_fused,
              "exact_square": exact_square, "centered_float32_copy": centered_float32_copy,
              "welford_batch_norm": welford_batch_norm, "welford_float_copy": welford_float_copy}


def ms(fn, x, iters=20) -> float:
    for _ in range(3):
        fn(x)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn(x)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters


def errors(sums, reference, n):
    (s, q), (rs, rq) = sums, reference
    var, rvar = q / n - (s / n).square(), rq / n - (rs / n).square()
    return {"var_rel_max": float(((var - rvar).abs() / rvar.clamp_min(1e-30)).max()),
            "norm_rel_max": float(((q.sqrt() - rq.sqrt()).abs() / rq.sqrt().clamp_min(1e-30)).max())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--dims", default="4096,11008")
    p.add_argument("--dtypes", default="float16,bfloat16")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    rows = []
    for dtype_name in args.dtypes.split(","):
        dtype = getattr(torch, dtype_name)
        for dim in map(int, args.dims.split(",")):
            x = hard_activations(args.tokens, dim, "cuda", dtype)
            reference = float64_sums(x)
            for name, fn in CANDIDATES.items():
                row = {"dtype": dtype_name, "dim": dim, "tokens": args.tokens, "candidate": name, "ms": ms(fn, x),
                       **errors(fn(x), reference, args.tokens)}
                rows.append(row)
                print(json.dumps(row), flush=True)
    print("| dtype | dim | candidate | ms | max rel. error of var | of norm |\n|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['dtype']} | {r['dim']} | {r['candidate']} | {r['ms']:.3f} | {r['var_rel_max']:.2e} | "
              f"{r['norm_rel_max']:.2e} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()

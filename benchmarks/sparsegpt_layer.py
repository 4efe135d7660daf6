"""Time SparseGPT's per-layer work apart from the model: Hessian accumulation, inverse factor, column sweep.

    python benchmarks/sparsegpt_layer.py --device cuda --json sparsegpt_layer.json

``--sweeps columns,solve`` compares the column loop with the batched triangular solve.

Random inputs with the shapes of Llama-2-7B's layers (q/k/v/o/gate/up read 4096 inputs, down 11008) and
128 x 2048 calibration tokens, so the per-block time of ``speed.py`` can be split into its parts. Each
part is synchronised and timed on its own; the sweep is run twice and the second (warm) run reported.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from optimum_statprune.tensor_math.sparsegpt import HessianAccumulator, _inverse_factor, sparsegpt_prune

LAYERS = {"q/k/v/o (4096 x 4096)": (4096, 4096), "gate/up (11008 x 4096)": (11008, 4096),
          "down (4096 x 11008)": (4096, 11008)}


def _timed(device: str, fn, *fn_args, **fn_kwargs):
    if device == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn(*fn_args, **fn_kwargs)
    if device == "cuda":
        torch.cuda.synchronize()
    return out, time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tokens", type=int, default=128 * 2048)
    p.add_argument("--patterns", default="unstructured,2:4")
    p.add_argument("--sweeps", default="columns", help='e.g. "columns,solve" (solve: unstructured only)')
    p.add_argument("--json", default=None)
    args = p.parse_args()
    gen = torch.Generator(device=args.device).manual_seed(0)
    rows = []
    for name, (d_out, d_in) in LAYERS.items():
        x = torch.randn(args.tokens, d_in, generator=gen, device=args.device, dtype=torch.float16)
        acc = HessianAccumulator(d_in, device=args.device)
        _, t_hessian = _timed(args.device, acc.update, x)
        del x
        h = acc.hessian()
        damp = 0.01 * float(h.diagonal().mean())
        _, t_inverse = _timed(args.device, _inverse_factor, h, damp)
        w = torch.randn(d_out, d_in, generator=gen, device=args.device, dtype=torch.float16) * 0.02
        for pattern in args.patterns.split(","):
            for sweep in args.sweeps.split(","):
                if sweep == "solve" and pattern != "unstructured":
                    continue
                sparsegpt_prune(w, h, 0.5, pattern, sweep=sweep)  # warm-up
                result, t_total = _timed(args.device, sparsegpt_prune, w, h, 0.5, pattern, sweep=sweep)
                rows.append({"layer": name, "pattern": pattern, "sweep": sweep, "hessian_s": t_hessian,
                             "inverse_s": t_inverse, "prune_s": t_total, "columns_per_s": d_in / t_total,
                             "error": result.error})
                print(json.dumps(rows[-1]), flush=True)
    cols = ["layer", "pattern", "sweep", "hessian_s", "inverse_s", "prune_s", "columns_per_s"]
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]) for c in cols) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "device": torch.cuda.get_device_name()
                                               if args.device == "cuda" else "cpu", "rows": rows}, indent=2))


if __name__ == "__main__":
    main()

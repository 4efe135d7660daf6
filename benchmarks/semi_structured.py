"""2:4 sparse kernels on this stack, measured: does a 2:4-pruned model run faster?

    python benchmarks/semi_structured.py --json semi.json                 # per-layer table + 7B model
    python benchmarks/semi_structured.py --tokens 1,128,2048 --no-model   # per-layer only

Per layer (Llama-2-7B and Llama-3-8B linear shapes, fp16, one H200): dense ``F.linear`` against the same
2:4-pruned weight as a ``torch.sparse`` semi-structured tensor (cuSPARSELt; the CUTLASS path refuses compute
capability 9.x), at 1 to 8192 tokens per call. Each is timed eagerly and replayed from a CUDA graph: a
graph replays only the kernels, so the gap between the two is host-side fixed cost (argument checks,
padding, the cuSPARSELt plan set up on every call) that a serving stack which captures graphs would not pay.
The sparse result is the transpose of ``W @ x.T``, a column-major view; ``sparse_graph_contiguous_ms`` adds
the copy to row-major that the layers after it need (``SemiStructuredLinear`` makes it).
``direct`` calls ``torch._cslt_sparse_mm`` on the compressed weight with the input already transposed,
with the algorithm chosen once by ``torch._cslt_sparse_mm_search`` (the plan search torch offers), to
separate the library's kernel from torch's wrapper.

Whole model: a Llama-2-7B-shaped model with random fp16 weights, its block linears 2:4-pruned by
magnitude, then converted with ``optimum_statprune.semi_structured.to_semi_structured``: prefill of 1 x 2048 and
8 x 2048 tokens and greedy decode (batch 1 and 16, 64 new tokens after a 128-token prompt), dense against
sparse, eager; the prefill also replayed from a CUDA graph and under ``torch.compile`` (``--model-modes``), to
see whether the per-call setup can be removed for a whole model. Prints markdown tables and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

LAYER_SHAPES = {  # name: (d_out, d_in)
    "q/k/v/o 4096x4096": (4096, 4096),
    "gate/up 4096->11008": (11008, 4096),
    "down 11008->4096": (4096, 11008),
    "gate/up 4096->14336": (14336, 4096),
    "down 14336->4096": (4096, 14336),
}
TOKENS = (1, 16, 128, 512, 2048, 8192)


def two_four(weight: torch.Tensor) -> torch.Tensor:
    """Keep the 2 largest magnitudes of every 4 consecutive inputs."""
    groups = weight.reshape(weight.shape[0], -1, 4)
    keep = groups.abs().topk(2, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return (groups * mask).reshape_as(weight)


def cuda_ms(fn, iters: int = 50, warmup: int = 5) -> float:
    """Median milliseconds of ``fn`` over ``iters`` calls, each timed with CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def graph_ms(fn, iters: int = 50) -> float:
    """Median milliseconds of replaying ``fn`` captured in a CUDA graph (kernels only, no host work)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return cuda_ms(graph.replay, iters)


def layer_row(name: str, weight: torch.Tensor, sparse: torch.Tensor, compressed: torch.Tensor, n: int) -> dict:
    """One layer shape at ``n`` tokens per call: dense, sparse, direct cuSPARSELt, and both from graphs."""
    x = torch.randn(n, weight.shape[1], device="cuda", dtype=torch.float16)
    xt = x.t().contiguous()
    row: dict = {"layer": name, "tokens": n}
    row["dense_ms"] = cuda_ms(lambda: F.linear(x, weight))
    row["sparse_ms"] = cuda_ms(lambda: F.linear(x, sparse))
    try:
        alg = torch._cslt_sparse_mm_search(compressed, xt)
        row["direct_ms"] = cuda_ms(lambda: torch._cslt_sparse_mm(compressed, xt, alg_id=alg))
    except (RuntimeError, TypeError) as e:  # an API or a shape the search does not take
        row["direct_error"] = str(e).splitlines()[0]
    row["dense_graph_ms"] = graph_ms(lambda: F.linear(x, weight))
    try:
        row["sparse_graph_ms"] = graph_ms(lambda: F.linear(x, sparse))
        # what a model pays: the sparse result is a column-major view, made row-major for the next layer
        row["sparse_graph_contiguous_ms"] = graph_ms(lambda: F.linear(x, sparse).contiguous())
    except RuntimeError as e:
        row["sparse_graph_error"] = str(e).splitlines()[0]
    row["max_abs_diff"] = float((F.linear(x, sparse).float() - F.linear(x, weight).float()).abs().max())
    return row


def layer_rows(tokens: list[int]) -> list[dict]:
    from torch.sparse import to_sparse_semi_structured

    rows = []
    for name, (d_out, d_in) in LAYER_SHAPES.items():
        weight = two_four(torch.randn(d_out, d_in, device="cuda", dtype=torch.float16) * 0.02)
        sparse = to_sparse_semi_structured(weight)
        compressed = torch._cslt_compress(weight)
        for n in tokens:
            rows.append(layer_row(name, weight, sparse, compressed, n))
            print(json.dumps(rows[-1]), flush=True)
        torch.cuda.empty_cache()
    return rows


def model_rows(modes: set[str]) -> list[dict]:
    import transformers as tf

    from optimum_statprune.semi_structured import to_semi_structured

    config = tf.LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                            num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = tf.LlamaForCausalLM(config).to(torch.float16).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            for module in layer.modules():
                if isinstance(module, torch.nn.Linear):
                    module.weight.copy_(two_four(module.weight))
    rows = []

    def graphed(fn):
        """``fn`` captured once in a CUDA graph; returns a replay: the kernels alone, no host-side work."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()  # warm-up outside the capture (lazy init, plan set-up)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        return graph.replay

    def compiled(ids):
        """The model's forward under ``torch.compile`` (default mode), compiled on the first call."""
        forward = torch.compile(model.forward)
        forward(ids, use_cache=False)
        return lambda: forward(ids, use_cache=False)

    def measure(label: str) -> None:
        with torch.no_grad():
            for batch, length in ((1, 2048), (8, 2048)):
                ids = torch.randint(0, config.vocab_size, (batch, length), device="cuda")
                ms = cuda_ms(lambda ids=ids: model(ids, use_cache=False), iters=5, warmup=2)
                rows.append({"model": label, "phase": "prefill", "batch": batch, "tokens": length, "ms": ms})
                print(json.dumps(rows[-1]), flush=True)
                for mode, run in (("graph", lambda ids=ids: graphed(lambda: model(ids, use_cache=False).logits)),
                                  ("compile", lambda ids=ids: compiled(ids))):
                    if mode not in modes:
                        continue
                    row = {"model": label, "phase": f"prefill ({mode})", "batch": batch, "tokens": length}
                    try:
                        row["ms"] = cuda_ms(run(), iters=5, warmup=2)
                    except Exception as e:  # noqa: BLE001 (recorded: whether it works at all is the finding)
                        row["error"] = str(e).splitlines()[0][:300] if str(e) else type(e).__name__
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    torch.cuda.empty_cache()
            for batch in (1, 16):
                ids = torch.randint(0, config.vocab_size, (batch, 128), device="cuda")
                model.generate(ids, max_new_tokens=4, min_new_tokens=4, do_sample=False)  # warm-up
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                model.generate(ids, max_new_tokens=64, min_new_tokens=64, do_sample=False)
                torch.cuda.synchronize()
                seconds = time.perf_counter() - t0
                rows.append({"model": label, "phase": "decode", "batch": batch, "new_tokens": 64,
                             "ms_per_token": 1000 * seconds / 64})
                print(json.dumps(rows[-1]), flush=True)

    measure("dense")
    converted = to_semi_structured(model)
    rows.append({"model": "sparse", "converted_linears": len(converted)})
    measure("sparse")
    return rows


def markdown(layer: list[dict], model: list[dict]) -> str:
    lines = ["| layer | tokens | dense ms | sparse ms | sparse/dense | direct ms | dense graph | sparse graph | graph sparse/dense |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in layer:
        sg = r.get("sparse_graph_ms")
        graph = ("", "") if sg is None else (f"{sg:.4f}", f"{sg / r['dense_graph_ms']:.2f}")
        lines.append(
            f"| {r['layer']} | {r['tokens']} | {r['dense_ms']:.4f} | {r['sparse_ms']:.4f} | "
            f"{r['sparse_ms'] / r['dense_ms']:.2f} | {r.get('direct_ms', float('nan')):.4f} | "
            f"{r['dense_graph_ms']:.4f} | {graph[0]} | {graph[1]} |"
        )
    if model:
        lines += ["", "| model | phase | batch | ms (prefill) / ms per token (decode) |", "|---|---|---|---|"]
        for r in model:
            if "phase" in r:
                value = r.get("ms", r.get("ms_per_token"))
                lines.append(f"| {r['model']} | {r['phase']} | {r['batch']} | "
                             f"{r.get('error') if value is None else f'{value:.2f}'} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", default=",".join(map(str, TOKENS)))
    p.add_argument("--no-model", action="store_true", help="skip the whole-model prefill/decode")
    p.add_argument("--model-modes", default="graph,compile",
                   help="besides eager, time the whole model's prefill replayed from a CUDA graph and under torch.compile")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("semi-structured sparse kernels need a CUDA GPU")
    info = {"device": torch.cuda.get_device_name(), "capability": torch.cuda.get_device_capability(),
            "torch": torch.__version__}
    print(json.dumps(info), flush=True)
    layer = layer_rows([int(t) for t in args.tokens.split(",")])
    model = [] if args.no_model else model_rows(set(filter(None, args.model_modes.split(","))))
    print(markdown(layer, model))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"info": info, "layers": layer, "model": model}, f, indent=1)


if __name__ == "__main__":
    main()

"""Speed protocol (docs/protocols.md): random-weight models with real shapes, pruned shard to shard.

    python benchmarks/speed.py --shapes llama2-7b --methods magnitude,wanda,statprune,sparsegpt \
        --workdir /tmp/speed --json speed.json [--peer-python python3 --peer-path /tmp/peer]

Each run is a fresh subprocess, so peak host RSS (ru_maxrss) and peak GPU memory
(torch.cuda.max_memory_allocated) belong to that run alone. End-to-end seconds cover
load -> calibrate -> prune -> save, measured inside the process after imports. The peer
(llmcompressor, its own environment) runs on the same checkpoint and the same token ids.

Any registered method or preset name works, e.g. the weight update's preset against SparseGPT:

    python benchmarks/speed.py --shapes llama2-7b --methods statprune,quality,sparsegpt --workdir /tmp/speed --json speed.json

``--methods io`` times the streaming I/O alone (magnitude's pipeline with the pruning step a no-op).
A/B of the streaming I/O knobs in one run (variants alternate, each run a fresh process):

    python benchmarks/speed.py --shapes llama2-7b --methods magnitude,wanda --variants "default;legacy" --repeats 2

``legacy`` = ``prefetch=0,writer_threads=1,sync=inline,reuse_write_buffers=0,pin_write_buffers=0`` (no
prefetch, one writer, fsync per shard in the writer, a fresh pageable host buffer per written block);
``fresh`` = ``reuse_write_buffers=0,pin_write_buffers=0``; ``pageable`` = ``pin_write_buffers=0``.
``in-memory`` loads the whole model onto the device first and times ``prune`` alone: the compute floor of
the engine, with no checkpoint I/O. Any ``knob=value`` list of ``StreamingOptions`` fields
(prefetch / writer_threads / sync / reuse_write_buffers / pin_write_buffers) works.
``weights_digest`` (sha256 over the manifest's per-layer hashes) must agree across variants.

``--methods floor`` is the compute floor the engine is measured against: the whole model on the device,
block 0's inputs captured as the engine does, then every block run twice over the calibration set (one
pass to observe, one to make the next block's inputs) and nothing else.

``--profile DIR`` runs each run under ``torch.profiler`` and writes its op table, the engine's phases
(``statprune::observe`` with ``::statistics`` inside it, ``::prune``, ``::next_inputs``, ``::load``,
``::store``) and the GPU's idle time by phase to ``DIR``; the profiler's overhead makes those runs' times
not comparable with unprofiled ones.

``--nproc N`` runs each statprune run in N processes launched by ``torch.distributed.run`` (one GPU each
on ``cuda``; gloo on ``--device cpu``): ``--device cpu --shapes tiny --nproc 2`` tries it on a CPU. The
peaks reported are the largest of any rank; the digest differs from one process's within the tolerances
of docs/performance.md (sums in another order).
"""

from __future__ import annotations

import argparse
import bisect
import contextlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

SHAPES = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32, vocab_size=32000),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
    # Llama-3-70B's block (8192 wide, 28672-wide MLP, GQA 64/8) and vocabulary, 8 blocks: 18 GB of fp16,
    # so input and output fit twice on a 64 GiB disk
    "llama3-70b-8": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=8, num_attention_heads=64,
                         num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0),
    # ~1.4 GB of fp16 weights in 12 blocks of 103 MB: for timing the streaming I/O on a CPU
    "mid": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=12, num_attention_heads=16,
                num_key_value_heads=16, vocab_size=32000),
    # a small shape for trying the script on a CPU
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=1000),
}


def write_checkpoint(shape: str, directory: Path, device: str) -> None:
    """Random fp16 weights (std 0.02, norms 1) written one block per shard, never all in memory."""
    import torch
    import transformers as tf
    from safetensors.torch import save_file

    if (directory / "model.safetensors.index.json").exists():
        return
    directory.mkdir(parents=True, exist_ok=True)
    config = tf.LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, torch_dtype="float16")
    with torch.device("meta"):
        skeleton = tf.LlamaForCausalLM(config)
    names = skeleton.state_dict()
    n = config.num_hidden_layers
    gen = torch.Generator(device=device).manual_seed(0)

    def fill(keys):
        out = {}
        for k in keys:
            shape_ = names[k].shape
            if len(shape_) == 1:
                out[k] = torch.ones(shape_, dtype=torch.float16)
            else:
                out[k] = (torch.randn(shape_, generator=gen, device=device, dtype=torch.float32) * 0.02).half().cpu()
        return out

    weight_map = {}
    groups = [[k for k in names if k.startswith(f"model.layers.{i}.")] for i in range(n)]
    groups.append([k for k in names if not k.startswith("model.layers.")])
    for i, keys in enumerate(groups):
        file = f"model-{i + 1:05d}-of-{n + 1:05d}.safetensors"
        save_file(fill(keys), directory / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, file))
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config.save_pretrained(directory)


def write_tokens(path: Path, vocab: int, nsamples: int, seqlen: int) -> None:
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    save_file({"input_ids": torch.randint(0, vocab, (nsamples, seqlen), generator=gen)}, path)


VARIANTS = {"default": "",
            "legacy": "prefetch=0,writer_threads=1,sync=inline,reuse_write_buffers=0,pin_write_buffers=0",
            "fresh": "reuse_write_buffers=0,pin_write_buffers=0", "pageable": "pin_write_buffers=0"}


def streaming_options(spec: str):
    """The ``StreamingOptions`` of a variant name or a "prefetch=0,writer_threads=1,sync=inline" list."""
    from optimum_statprune.engine.streaming import StreamingOptions

    return StreamingOptions.parse(VARIANTS.get(spec, spec))


def _floor(args: argparse.Namespace, ids, device: str, profiler) -> float:
    """Seconds for two dense passes of every block over the calibration set, the model already loaded."""
    import torch
    from transformers import AutoModelForCausalLM

    from optimum_statprune.engine.capture import call_block, capture_block_inputs
    from optimum_statprune.engine.loop import iter_batches
    from optimum_statprune.engine.targets import find_blocks

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float16, device_map=device).eval()
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    start = time.perf_counter()
    with torch.no_grad(), profiler:
        path, blocks = find_blocks(model, None)
        batches = list(iter_batches(ids, None, args.batch_size))
        inputs = capture_block_inputs(model, path, blocks, batches, torch.device(device))
        hidden = inputs.hidden
        for i, block in enumerate(blocks):
            for b, h in enumerate(hidden):
                call_block(block, inputs, i, b, h)
            hidden = [call_block(block, inputs, i, b, h) for b, h in enumerate(hidden)]
        sync()
    return time.perf_counter() - start


def run_one(args: argparse.Namespace) -> dict:
    """One pruning run in this process (called in a subprocess by main)."""
    import torch
    from safetensors.torch import load_file

    from optimum_statprune import StatPruneConfig, StatPruner

    in_memory = args.variant == "in-memory"
    options = streaming_options(args.variant) if not in_memory else None
    method = args.method
    if method == "io":  # the streaming I/O floor: magnitude's pipeline with the pruning step a no-op
        from optimum_statprune.engine import loop as engine

        engine._prune_block = lambda *a, **k: []
        method = "magnitude"

    ids = load_file(args.tokens)["input_ids"]
    device = args.device
    if device == "cuda" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"  # one GPU per rank (torch.distributed.run)
    profiler = contextlib.nullcontext()
    if args.profile:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        profiler = torch.profiler.profile(activities=activities)
    profile_path = Path(args.profile or ".") / f"{Path(args.output).name}-{args.variant or 'default'}.txt"
    if method == "floor":
        total = _floor(args, ids, device, profiler)
        if args.profile:
            _write_profile(profiler, profile_path)
        return {"nproc": 1, "tool": "optimum-statprune", "method": "floor", "end_to_end_s": total,
                "pruning_s": total, "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None,
                "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    start = time.perf_counter()
    config = StatPruneConfig(method=method, sparsity=args.sparsity, pattern=args.pattern,
                             nsamples=ids.shape[0], seqlen=ids.shape[1], batch_size=args.batch_size)
    if in_memory:  # the compute alone: the whole model already on the device, nothing read or written
        pruner = StatPruner.from_pretrained(args.model, config=config, device=device, dtype=torch.float16,
                                            device_map=device)
        pruner.model  # noqa: B018 (loads it)
        start = time.perf_counter()
        with profiler:
            pruner.prune(ids, progress=False)
    else:
        pruner = StatPruner.from_pretrained(args.model, config=config, device=device, dtype=torch.float16)
        with profiler:
            pruner.prune(ids, output_dir=args.output, overwrite=True, progress=False, streaming=options)
    total = time.perf_counter() - start
    if args.profile:
        _write_profile(profiler, profile_path)
    report = pruner.report
    blocks = report.block_seconds
    dist = pruner.dist
    gpu = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    peaks = dist.gather_objects((total, gpu, rss))  # every rank's: the slowest and the largest are reported
    total = max(p[0] for p in peaks)
    gpu = max(p[1] for p in peaks) if gpu is not None else None
    rss = max(p[2] for p in peaks)
    return {
        "nproc": dist.world_size,
        "tool": "optimum-statprune",
        "method": args.method,
        "pattern": args.pattern,
        "end_to_end_s": total,
        "pruning_s": report.seconds,
        "block_s_first": blocks[0],
        "block_s_median": sorted(blocks)[len(blocks) // 2],
        "block_s_last": blocks[-1],
        "block_s_max": max(blocks),
        "peak_gpu_gib": gpu,
        "peak_rss_gib": rss,
        "timings": report.timings,  # a streamed run's stages outside the blocks (setup, capture, flush, ...)
        "sparsity": sum(r["sparsity"] * r["shape"][0] * r["shape"][1] for r in report.layers)
        / sum(r["shape"][0] * r["shape"][1] for r in report.layers) if report.layers else None,
    }


def _write_profile(prof, path: Path) -> None:
    """The engine's phases, then the ops by device time and by host time."""
    path.parent.mkdir(parents=True, exist_ok=True)
    events = prof.key_averages()
    phases = [e for e in events if e.key.startswith("statprune::")]
    lines = ["phase | calls | host total s | device total s"]
    for e in sorted(phases, key=lambda e: -e.cpu_time_total):
        lines.append(f"{e.key} | {e.count} | {e.cpu_time_total / 1e6:.3f} | {e.device_time_total / 1e6:.3f}")
    sort = "cuda_time_total" if any(e.device_time_total for e in events) else "cpu_time_total"
    lines += _idle_gaps(prof)
    lines += ["", events.table(sort_by=sort, row_limit=45), "", events.table(sort_by="self_cpu_time_total", row_limit=30)]
    path.write_text("\n".join(lines))


def _idle_gaps(prof, top: int = 15) -> list[str]:
    """How long the GPU ran nothing, and its longest idle stretches with the engine phase the host was in:
    where the host, not the GPU, sets the pace."""
    from torch.autograd import DeviceType

    events = prof.events()
    device = sorted((e.time_range.start, e.time_range.end) for e in events  # kernels and copies, not the
                    if e.device_type == DeviceType.CUDA and e.time_range.end > e.time_range.start  # phases' spans
                    and not e.name.startswith("statprune::"))
    if not device:
        return []
    labels = sorted((e.time_range.start, e.time_range.end, e.name) for e in events
                    if e.device_type == DeviceType.CPU and e.name.startswith("statprune::"))
    phases = []  # the outermost ones (statistics run inside observe)
    for label in labels:
        if not phases or label[0] >= phases[-1][1]:
            phases.append(label)
    busy, gaps, (start, end) = 0.0, [], device[0]
    for s, e in device[1:]:
        if s > end:
            busy += end - start
            gaps.append((s - end, end))
            start, end = s, e
        else:
            end = max(end, e)
    busy += end - start
    span = device[-1][1] - device[0][0]

    starts = [p[0] for p in phases]

    def phase_at(t: float) -> str:  # the outermost phases do not nest: the last one begun before t
        k = bisect.bisect_right(starts, t) - 1
        return phases[k][2] if k >= 0 and t <= phases[k][1] else "(outside the block loop)"

    idle: dict[str, float] = {}
    for length, at in gaps:
        name = phase_at(at)
        idle[name] = idle.get(name, 0.0) + length
    lines = ["", f"GPU busy {busy / 1e6:.3f} s of {span / 1e6:.3f} s from its first to its last kernel "
             f"({busy / span:.1%}); idle by the host's phase at the gap's start:"]
    lines += [f"  {name}: {seconds / 1e6:.3f} s" for name, seconds in sorted(idle.items(), key=lambda kv: -kv[1])]
    lines.append("longest idle stretches (ms, at s from the first kernel, phase):")
    for length, at in sorted(gaps, reverse=True)[:top]:
        lines.append(f"  {length / 1e3:.1f} ms at {(at - device[0][0]) / 1e6:.3f} s, {phase_at(at)}")
    return lines


def _weights_digest(output: Path) -> str | None:
    """sha256 over the manifest's per-layer sha256s: equal digests mean bit-identical pruned weights."""
    import hashlib

    manifest = output / "pruning_manifest.json"
    if not manifest.is_file():
        return None
    layers = json.loads(manifest.read_text())["layers"]
    return hashlib.sha256("".join(r.get("sha256", "") for r in layers).encode()).hexdigest()[:16]


def _child(cmd: list[str], env: dict | None = None, timeout: int = 1800) -> dict:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        err = proc.stderr.strip()
        # the last line for the table, the traceback's end kept in the JSON rows
        return {"error": err.splitlines()[-1] if err else f"exit {proc.returncode}", "stderr_tail": err[-3000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _emit(rows: list[dict], row: dict, jsonl: str | None) -> None:
    """Keep a finished row, and append it to ``jsonl`` at once: a run cut off by a time limit keeps its rows."""
    rows.append(row)
    print(json.dumps(row), file=sys.stderr)
    if jsonl:
        with open(jsonl, "a") as f:
            f.write(json.dumps(row) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="llama2-7b")
    p.add_argument("--methods", default="magnitude,wanda,statprune,sparsegpt")
    p.add_argument("--pattern", default="unstructured")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cuda")
    p.add_argument("--workdir", default="/tmp/statprune-speed")
    p.add_argument("--json", default=None)
    p.add_argument("--jsonl", default=None, help="append each row here as soon as it is measured")
    p.add_argument("--peer-python", default=None, help="python of the llmcompressor environment")
    p.add_argument("--peer-path", default=None, help="PYTHONPATH for the peer (e.g. unpacked wheels)")
    p.add_argument("--peer-methods", default="wanda,sparsegpt")
    p.add_argument("--keep-outputs", action="store_true", help="keep the pruned checkpoints (disk!)")
    p.add_argument("--variants", default="default",
                   help='";"-separated streaming knob sets to compare, e.g. "default;legacy" (see the docstring)')
    p.add_argument("--repeats", type=int, default=1, help="run every method x variant this many times, interleaved")
    p.add_argument("--nproc", type=int, default=None,
                   help="processes per statprune run, launched by torch.distributed.run (one GPU each); "
                        "--nproc 1 times the launcher with one process against the plain path (no --nproc)")
    p.add_argument("--profile", default=None, help="write a torch.profiler table per run to this directory")
    p.add_argument("--variant", default="", help=argparse.SUPPRESS)
    p.add_argument("--run-one", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", help=argparse.SUPPRESS)
    p.add_argument("--tokens", help=argparse.SUPPRESS)
    p.add_argument("--output", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.run_one:
        row = run_one(args)
        if int(os.environ.get("RANK", "0")) == 0:
            print(json.dumps(row))
        return

    work = Path(args.workdir)
    rows = []
    for shape in args.shapes.split(","):
        model_dir = work / shape
        t0 = time.perf_counter()
        write_checkpoint(shape, model_dir, args.device if args.device != "cpu" else "cpu")
        print(f"[{shape}] checkpoint ready in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
        tokens = work / f"tokens-{args.nsamples}x{args.seqlen}.safetensors"
        write_tokens(tokens, SHAPES[shape]["vocab_size"], args.nsamples, args.seqlen)
        variants = args.variants.split(";")
        for repeat in range(args.repeats):
            for method in filter(None, args.methods.split(",")):
                for variant in variants:
                    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node",
                                str(args.nproc)] if args.nproc else [sys.executable]
                    cmd = [*launcher, __file__, "--run-one", "--model", str(model_dir), "--tokens", str(tokens),
                           "--output", str(work / f"out-{shape}-{method}"), "--method", method, "--pattern",
                           args.pattern, "--sparsity", str(args.sparsity), "--batch-size", str(args.batch_size),
                           "--device", args.device, "--variant", variant]
                    if args.profile:
                        cmd += ["--profile", args.profile]
                    row = {"shape": shape, **_child(cmd)}
                    if "error" not in row:
                        row["weights_digest"] = _weights_digest(work / f"out-{shape}-{method}")
                    if not args.keep_outputs:
                        shutil.rmtree(work / f"out-{shape}-{method}", ignore_errors=True)
                    row.setdefault("method", method)
                    row.update(variant=variant, repeat=repeat)
                    _emit(rows, row, args.jsonl)
        if args.peer_python:
            env = dict(os.environ)
            if args.peer_path:
                env["PYTHONPATH"] = args.peer_path
            peer = Path(__file__).with_name("peer_llmcompressor.py")
            for method in filter(None, args.peer_methods.split(",")):
                cmd = [args.peer_python, str(peer), "--model", str(model_dir), "--method", method, "--sparsity",
                       str(args.sparsity), "--pattern", args.pattern, "--calibration", str(tokens), "--device",
                       args.device, "--dtype", "float16", "--output", str(work / f"peer-{shape}-{method}"),
                       "--json", str(work / f"peer-{shape}-{method}.json")]
                result = _child(cmd, env=env)  # env: --peer-path must reach the peer (it did not before)
                if "error" not in result and (work / f"peer-{shape}-{method}.json").exists():
                    result = json.loads((work / f"peer-{shape}-{method}.json").read_text())
                if not args.keep_outputs:
                    shutil.rmtree(work / f"peer-{shape}-{method}", ignore_errors=True)
                _emit(rows, {"shape": shape, "tool": "llmcompressor", "method": method, **result}, args.jsonl)

    cols = ["shape", "tool", "method", "variant", "nproc", "end_to_end_s", "pruning_s", "block_s_first", "block_s_median",
            "block_s_last", "peak_gpu_gib", "peak_rss_gib", "sparsity", "weights_digest"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    for r in rows:
        cells = []
        for c in cols:
            v = r.get(c, r.get("error", "") if c == "end_to_end_s" else "")
            cells.append(f"{v:.2f}" if isinstance(v, float) else str(v))
        print("| " + " | ".join(cells) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()

"""What a streamed run pays on the host before its first block: the CUDA context, pinned allocations, and
reading a large vocabulary's embedding and ``lm_head`` (a Llama-3-70B shape's, 2 x 2.1 GB) to the GPU by
each available path, and copying them to an output shard a chunk at a time (``write_copy``).

    python benchmarks/host_io.py --json host-io.json

Prints one line per measurement (seconds) and writes them as JSON. Needs a GPU and ~9 GB of disk.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="/tmp/statprune-host-io")
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--hidden", type=int, default=8192)
    p.add_argument("--json", default=None)
    args = p.parse_args()

    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    from optimum_statprune.checkpoint import shards

    results: dict[str, float] = {}

    def timed(name: str, fn) -> None:
        start = time.perf_counter()
        fn()
        if torch.cuda.is_initialized():
            torch.cuda.synchronize()
        results[name] = time.perf_counter() - start
        print(f"{name}: {results[name]:.3f} s", flush=True)

    timed("cuda_init", torch.cuda.init)
    timed("first_allocation", lambda: torch.empty(1, device="cuda"))
    a = torch.randn(64, 64, device="cuda")
    timed("first_matmul", lambda: (a @ a).sum().item())
    timed("pin_64MiB", lambda: torch.empty(64 << 20, dtype=torch.uint8, pin_memory=True))
    timed("pin_1700MiB", lambda: torch.empty(1700 << 20, dtype=torch.uint8, pin_memory=True))

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    file = work / "outside.safetensors"
    gen = torch.Generator(device="cuda").manual_seed(0)
    shape = (args.vocab, args.hidden)
    save_file({"model.embed_tokens.weight": torch.randn(shape, device="cuda", generator=gen).half().cpu(),
               "lm_head.weight": torch.randn(shape, device="cuda", generator=gen).half().cpu(),
               "model.norm.weight": torch.ones(args.hidden, dtype=torch.float16)}, file)
    stored = shards.locate({file: None})

    for rep in range(2):
        timed(f"read_tensors_to_gpu_{rep}", lambda: dict(shards.read_tensors(stored, "cuda")))
    host: dict = {}
    timed("read_to_host_pageable", lambda: host.update(shards.read_to_host({file: None})[0]))
    timed("pageable_to_gpu", lambda: {k: v.to("cuda") for k, v in host.items()})
    host.clear()

    def via_safetensors() -> None:
        with safe_open(file, framework="pt", device="cuda") as f:
            {k: f.get_tensor(k) for k in f.keys()}  # noqa: B018, SIM118

    timed("safetensors_to_gpu", via_safetensors)
    timed("write_copy", lambda: shards.write_copy(work / "copy.safetensors", stored))
    shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"seconds": results, "bytes": 2 * args.vocab * args.hidden * 2}, indent=2))


if __name__ == "__main__":
    main()

"""End-to-end cost of the streaming run's integrity checks on a CPU, against another checkout of the code.

    python benchmarks/checks_cost.py --workdir /tmp/io-bench --code OLD_CHECKOUT --code . --repeats 3

Builds (once) a 16-block Llama with hidden size 512 in fp32 (226 MB in 13 shards), then prunes it with
Wanda (16 x 256 calibration tokens) shard to shard, each run a fresh process, alternating the given code
checkouts, and prints wall and whole-process CPU seconds per run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def build(src: Path) -> None:
    import torch
    import transformers as tf

    cfg = tf.LlamaConfig(vocab_size=8192, hidden_size=512, intermediate_size=1376, num_hidden_layers=16,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512)
    torch.manual_seed(0)
    tf.LlamaForCausalLM(cfg).save_pretrained(src, max_shard_size="20MB")


def run(src: Path, out: Path) -> dict:
    import resource

    import torch

    from optimum_statprune import StatPruneConfig, StatPruner

    torch.set_num_threads(1)
    ids = torch.randint(0, 8192, (16, 256), generator=torch.Generator().manual_seed(0))
    start = time.perf_counter()
    config = StatPruneConfig(method="wanda", nsamples=16, seqlen=256, batch_size=4)
    StatPruner.from_pretrained(src, config=config, device="cpu").prune(ids, output_dir=out, overwrite=True, progress=False)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"wall_s": round(time.perf_counter() - start, 2), "cpu_s": round(usage.ru_utime + usage.ru_stime, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", type=Path, required=True)
    p.add_argument("--code", action="append", required=True, help="a checkout to time (repeatable)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--run", nargs=2, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.run:
        print(json.dumps(run(Path(args.run[0]), Path(args.run[1]))))
        return
    src = args.workdir / "src"
    if not src.exists():
        build(src)
    for repeat in range(args.repeats):
        for code in args.code:
            path = os.pathsep.join(filter(None, [str(Path(code).resolve()), os.environ.get("PYTHONPATH")]))
            env = {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1"}
            proc = subprocess.run([sys.executable, __file__, "--workdir", str(args.workdir), "--code", code,
                                   "--run", str(src), str(args.workdir / "out")],
                                  capture_output=True, text=True, env=env, cwd=code, check=True)
            print(json.dumps({"code": code, "repeat": repeat, **json.loads(proc.stdout.splitlines()[-1])}))


if __name__ == "__main__":
    main()

"""One rank of a multi-process prune, launched by tests/test_distributed.py through
``python -m torch.distributed.run --nproc-per-node 2 tests/distributed_worker.py SPEC.json``.

SPEC: {"src": checkpoint dir, "runs": [{"config": {...}, "out": dir, "calibration": "ids"|"texts",
"in_memory": bool, "src": another checkpoint (optional), "cli": [arguments of ``optimum-statprune``] instead of a config,
"name": what the CLI run's per-rank output file is called (default "cli"), "crash_after": blocks rank 0 records in this run before it dies (optional)}],
"digests": dir where each rank writes the sha256 of its in-memory model's state (optional)}.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import token_ids  # noqa: E402

from optimum_statprune import StatPruneConfig, StatPruner  # noqa: E402

TEXTS = [" ".join("abcdefghijklmnopqrstuvwxyz"[(i * 7 + j) % 26] for j in range(6 + 3 * i)) for i in range(7)]
"""Seven samples of different lengths: the padded batches make every rank's share of real tokens differ."""


def calibration(kind: str):
    return TEXTS if kind == "texts" else token_ids(6, 16)


def crash(after: int) -> None:
    """Make rank 0 die, as abruptly as a kill, once its writer has recorded ``after`` blocks."""
    import optimum_statprune.engine.streaming as streaming

    recorded: list[int] = []
    original = streaming.ShardWriter._record

    def record_then_die(self, index, *args):  # a block is recorded once its shard is durable
        original(self, index, *args)
        recorded.append(index)
        if len(recorded) == after:
            os._exit(9)  # no cleanup, no finally

    streaming.ShardWriter._record = record_then_die


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    for run in spec["runs"]:
        if run.get("crash_after") is not None and os.environ.get("RANK") == "0":
            crash(run["crash_after"])
        if "cli" in run:  # what ``torchrun ... optimum-statprune prune ...`` runs, its output kept per rank
            from optimum_statprune import cli

            out, err = io.StringIO(), io.StringIO()
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = cli.main(run["cli"])
            Path(spec["digests"], f"{run.get('name', 'cli')}-rank{os.environ['RANK']}.txt").write_text(
                out.getvalue() + err.getvalue())
            if code:
                sys.exit(code)
            continue
        cfg = StatPruneConfig(**run["config"])
        pruner = StatPruner.from_pretrained(run.get("src", spec["src"]), config=cfg, device="cpu")
        data = calibration(run.get("calibration", "ids"))
        kwargs = {"allow_short_calibration": True} if run.get("calibration") == "texts" else {}
        if run.get("in_memory"):
            model = pruner.prune(data, progress=False, **kwargs)
            h = hashlib.sha256()
            for k, v in sorted(model.state_dict().items()):
                h.update(k.encode() + v.detach().contiguous().numpy().tobytes())
            Path(spec["digests"], f"{Path(run['out']).name}-rank{os.environ['RANK']}.txt").write_text(h.hexdigest())
            pruner.save_pretrained(run["out"])
        else:
            pruner.prune(data, output_dir=run["out"], progress=False, **kwargs)


if __name__ == "__main__":
    main(sys.argv[1])

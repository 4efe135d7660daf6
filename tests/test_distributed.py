"""Two processes (gloo, launched by ``torch.distributed.run`` itself) against one process.

Tolerances, and why they are not zero: the ranks' float64 channel sums are added in another order than
one process adds its batches (relative differences ~1e-16), and SparseGPT's ``X^T X`` is summed per rank in
float32, then across ranks in float64 (relative differences ~1e-7, the float32 rounding of one process's
running sum). Masks must be identical; kept weights that no method changes (Wanda) are identical;
compensated weights (statprune) may differ by a float32 rounding of the compensation factor (rtol 1e-6);
SparseGPT's updated weights, and the weight update's, by what 1e-7 in ``X^T X`` becomes through the
inverse (atol 1e-5 on weights of ~0.02). The token subsample is merged by global token index, so it is one process's exactly,
experts' included (they number their routed tokens among all tokens).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import build, tiny_tokenizer

from optimum_statprune import StatPruneConfig, StatPruner
from optimum_statprune.engine.distributed import DistContext, Share, owners
from optimum_statprune.engine.loop import CalibrationBatch
from optimum_statprune.sharing.verify import verify

TESTS = Path(__file__).parent
sys.path.insert(0, str(TESTS))
from distributed_worker import calibration  # noqa: E402

RUNS = {
    "wanda": ({"method": "wanda", "batch_size": 1}, "ids"),
    # padded text batches of different lengths, a subsample smaller than the tokens, the layer safety check
    "statprune": ({"method": "statprune", "batch_size": 2, "sample_tokens": 32}, "texts"),
    "statprune-block": ({"method": "statprune", "batch_size": 2, "sample_tokens": 32, "safety_scope": "block"}, "texts"),
    "sparsegpt": ({"method": "sparsegpt", "batch_size": 1}, "ids"),
    "sparsegpt-2_4": ({"method": "sparsegpt", "batch_size": 1, "pattern": "2:4"}, "ids"),
    # the weight update's solves are spread over the ranks like SparseGPT's (fixed mask: Wanda's)
    "wanda-update": ({"method": "wanda", "batch_size": 1, "update": "admm"}, "ids"),
    "owl": ({"method": "wanda", "batch_size": 1, "owl": True}, "ids"),
    # experts: the ranks route different tokens to them (an expert may see tokens on one rank only)
    "mixtral": ({"method": "wanda", "batch_size": 1}, "ids"),
    # experts' compensation reads a subsample of their routed tokens, numbered among all tokens on every rank
    "mixtral-statprune": ({"method": "statprune", "batch_size": 1, "sample_tokens": 8}, "ids"),
}
SOURCES = {"mixtral": "src-mixtral", "mixtral-statprune": "src-mixtral"}
KILLED = {"config": RUNS["statprune"][0], "calibration": "texts", "crash_after": 2}
TOLERANCE = {  # (rtol, atol) on the weights; masks are always compared exactly
    "wanda": (0, 0), "owl": (0, 0), "statprune": (1e-6, 0), "statprune-block": (1e-6, 0),
    "sparsegpt": (0, 1e-5), "sparsegpt-2_4": (0, 1e-5), "wanda-update": (0, 1e-5), "mixtral": (0, 0),
    "mixtral-statprune": (1e-6, 0),
}


LAUNCHERS = {
    "torchrun": ["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"],
    # accelerate's multi-GPU launcher sets the same environment (and runs on CPUs with gloo); one thread per
    # process as torchrun's runs have, so the kernels sum in the same order
    "accelerate": ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                   "--mixed_precision", "no", "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1"],
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(spec: dict, path: Path, launcher: str = "torchrun") -> subprocess.CompletedProcess:
    path.write_text(json.dumps(spec))
    port = ["--main_process_port", str(free_port())] if launcher == "accelerate" else []
    cmd = [sys.executable, *LAUNCHERS[launcher], *port, str(TESTS / "distributed_worker.py"), str(path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def two_process(tmp_path_factory):
    """One launch of two processes running every config and one in-memory prune, then a run whose rank 0 dies
    after two blocks (the launcher then stops the other rank: the launch fails)."""
    tmp = tmp_path_factory.mktemp("dist")
    src = tmp / "src"
    model = build("llama")
    model.config.num_hidden_layers = 4
    model = type(model)(model.config)  # 4 blocks, so there is a middle to die in
    model.save_pretrained(src, max_shard_size="40KB")
    tiny_tokenizer().save_pretrained(src)
    build("mixtral").save_pretrained(tmp / SOURCES["mixtral"])
    runs = [{"config": cfg, "out": str(tmp / name), "calibration": data, "src": str(tmp / SOURCES.get(name, "src"))}
            for name, (cfg, data) in RUNS.items()]
    runs.append({"config": RUNS["statprune"][0], "out": str(tmp / "in-memory"), "calibration": "texts",
                 "in_memory": True})
    corpus = tmp / "corpus.txt"
    corpus.write_text(" ".join("abcdefghijklmnopqrstuvwxyz"[(i * 11) % 26] for i in range(2000)))
    runs.append({"cli": ["prune", "--model", str(src), "--output", str(tmp / "cli"), "--calibration", str(corpus),
                         "--nsamples", "4", "--seqlen", "32", "--batch-size", "1", "--method", "wanda",
                         "--json", str(tmp / "cli-summary.json")]})
    for name, args in cli_eval_runs(tmp, src, corpus).items():
        runs.append({"cli": args, "name": name})
    runs.append({**KILLED, "out": str(tmp / "killed")})
    proc = launch({"src": str(src), "runs": runs, "digests": str(tmp)}, tmp / "spec.json")
    assert proc.returncode != 0 and "exitcode  : 9" in proc.stderr, proc.stderr[-4000:]
    return tmp, src, proc


def cli_eval_runs(tmp: Path, src: Path, corpus: Path, suffix: str = "") -> dict[str, list[str]]:
    """``prune --eval`` and ``eval`` on 5 windows (3 + 2 over two ranks); ``suffix`` names a one-process copy."""
    return {
        "prune-eval": ["prune", "--model", str(src), "--output", str(tmp / f"cli-eval{suffix}"), "--calibration",
                       str(corpus), "--nsamples", "4", "--seqlen", "32", "--batch-size", "1", "--method", "wanda",
                       "--eval", str(corpus), "--eval-windows", "5", "--json", str(tmp / f"prune-eval{suffix}.json")],
        "eval": ["eval", str(tmp / "cli"), "--data", str(corpus), "--windows", "5", "--seqlen", "32",
                 "--json", str(tmp / f"eval{suffix}.json")],
    }


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def one_process(src: Path, name: str, out: Path) -> Path:
    cfg, data = RUNS[name]
    kwargs = {"allow_short_calibration": True} if data == "texts" else {}
    StatPruner.from_pretrained(src, config=StatPruneConfig(**cfg), device="cpu").prune(
        calibration(data), output_dir=out, progress=False, **kwargs)
    return out


@pytest.mark.parametrize("name", list(RUNS))
def test_two_processes_give_one_process_masks_and_weights(two_process, tmp_path, name):
    tmp, src, _ = two_process
    two, one = tensors(tmp / name), tensors(one_process(tmp / SOURCES.get(name, "src"), name, tmp_path / name))
    assert two.keys() == one.keys()
    rtol, atol = TOLERANCE[name]
    for key in one:
        assert torch.equal(two[key] != 0, one[key] != 0), f"{name}: {key}'s mask differs"
        torch.testing.assert_close(two[key], one[key], rtol=rtol, atol=atol, msg=f"{name}: {key}")
    manifest = json.loads((tmp / name / "pruning_manifest.json").read_text())
    reference = json.loads((tmp_path / name / "pruning_manifest.json").read_text())
    assert manifest["world_size"] == 2 and reference["world_size"] == 1
    assert [r["tokens"] for r in manifest["layers"]] == [r["tokens"] for r in reference["layers"]]
    if "statprune" in name:  # the same compensation decisions (they read the merged subsample)
        assert [r["compensation"].get("applied") for r in manifest["layers"]] == \
            [r["compensation"].get("applied") for r in reference["layers"]]
    assert verify(tmp / name).ok


def test_in_memory_prune_leaves_every_rank_the_same_model_and_rank_0_saves(two_process, tmp_path):
    tmp, src, _ = two_process
    digests = {(tmp / f"in-memory-rank{r}.txt").read_text() for r in (0, 1)}
    assert len(digests) == 1  # both ranks hold the same pruned model
    saved = tensors(tmp / "in-memory")
    streamed = tensors(tmp / "statprune")
    for key, value in streamed.items():  # the in-memory and the streamed two-process runs agree bit for bit
        assert torch.equal(saved[key], value), key
    assert json.loads((tmp / "in-memory" / "pruning_manifest.json").read_text())["world_size"] == 2


def test_cli_under_the_launcher_speaks_and_writes_on_rank_0_only(two_process):
    tmp, _, _ = two_process
    assert (tmp / "cli-rank1.txt").read_text() == ""  # rank 1 prints nothing
    assert "sparsity" in (tmp / "cli-rank0.txt").read_text()
    assert json.loads((tmp / "cli-summary.json").read_text())["layers"] == 28
    assert json.loads((tmp / "cli" / "pruning_manifest.json").read_text())["world_size"] == 2
    assert verify(tmp / "cli").ok


def test_perplexity_under_the_launcher_equals_one_process_and_rank_1_is_silent(two_process):
    """``prune --eval`` and ``eval`` under two processes (each scoring its share of the 5 windows, which
    ``test_evaluate`` checks window by window) give one process's perplexities up to the order of float64
    additions; rank 1 prints nothing."""
    from optimum_statprune import cli

    tmp, src, _ = two_process
    for name, args in cli_eval_runs(tmp, src, tmp / "corpus.txt", suffix="-one").items():
        assert cli.main(args) == 0, name
        assert (tmp / f"{name}-rank1.txt").read_text() == ""
    two, one = json.loads((tmp / "prune-eval.json").read_text()), json.loads((tmp / "prune-eval-one.json").read_text())
    for key in ("dense_perplexity", "pruned_perplexity"):
        assert two["eval"][key] == pytest.approx(one["eval"][key], rel=1e-12), key
    assert two["eval"]["pruned_perplexity"] != pytest.approx(two["eval"]["dense_perplexity"], rel=1e-6)
    assert json.loads((tmp / "eval.json").read_text())["perplexity"] == pytest.approx(
        json.loads((tmp / "eval-one.json").read_text())["perplexity"], rel=1e-12)


def test_killed_two_process_run_resumes_bit_identical_under_accelerate_launch(two_process, tmp_path):
    tmp, src, _ = two_process
    out = tmp / "killed"
    partial = tmp / ".killed.partial"
    assert not out.exists() and partial.is_dir()  # nothing that looks like a finished model
    state = json.loads((partial / "statprune_state.json").read_text())
    assert len(state["blocks"]) == 2 and state["identity"]["world_size"] == 2
    run = {k: v for k, v in KILLED.items() if k != "crash_after"}
    # resumed under the other launcher: both give the same ranks
    resumed = launch({"src": str(src), "runs": [{**run, "out": str(out)}]}, tmp_path / "resume.json", "accelerate")
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    again, uninterrupted = tensors(out), tensors(tmp / "statprune")
    assert again.keys() == uninterrupted.keys()
    for key, value in uninterrupted.items():
        assert torch.equal(again[key], value), f"{key}: max difference {(again[key] - value).abs().max()}"
    assert verify(out).ok


def test_shares_are_contiguous_and_number_tokens_globally():
    batches = [CalibrationBatch(torch.zeros(2, 5, dtype=torch.long), torch.tensor([[1] * 5, [1] * 3 + [0] * 2]))
               for _ in range(5)]  # 8 real tokens each
    shares = [Share.of(DistContext(r, 2), batches, 1) for r in range(2)]
    assert [list(s.batches) for s in shares] == [[0, 1, 2], [3, 4]]
    assert [s.token_offset for s in shares] == [0, 24]
    assert [s.check_batches for s in shares] == [1, 0]  # the block check's first batch lives on rank 0


def test_more_processes_than_batches_is_refused():
    with pytest.raises(ValueError, match="3 processes need at least 3 calibration batches"):
        DistContext(0, 3).share(2)


def test_solves_go_to_the_least_loaded_rank_longest_first():
    llama7b = [(4096, 4096)] * 4 + [(11008, 4096)] * 2 + [(4096, 11008)]  # q k v o gate up down
    ranks = owners(DistContext(0, 2), llama7b)
    assert ranks == [1, 1, 0, 1, 1, 1, 0]  # down_proj (43% of the work) and v_proj on rank 0
    cost = [o * i * i for o, i in llama7b]
    assert max(sum(c for c, r in zip(cost, ranks, strict=True) if r == x) for x in (0, 1)) / sum(cost) < 0.51
    assert owners(DistContext(0, 4), [(8, 8)] * 4) == [0, 1, 2, 3]  # equal solves: one each, in rank order

"""Shard-to-shard pruning: equal to the in-memory result bit for bit, bounded memory, resumable."""

from __future__ import annotations

import glob
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import build, tiny_tokenizer, token_ids
from transformers import AutoModelForCausalLM

from optimum_statprune import StatPruneConfig, StatPruner
from optimum_statprune.manifest import MANIFEST_NAME
from optimum_statprune.streaming import ResumeMismatchError

TESTS = Path(__file__).resolve().parent


def _tensors(directory) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(glob.glob(str(Path(directory) / "*.safetensors"))):
        out.update(load_file(f))
    return out


def _assert_identical(a, b):
    ta, tb = _tensors(a), _tensors(b)
    assert set(ta) == set(tb)
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


@pytest.fixture
def checkpoint(tmp_path):
    src = tmp_path / "src"
    build("llama").save_pretrained(src, max_shard_size="40KB")
    tiny_tokenizer().save_pretrained(src)
    return src


@pytest.mark.parametrize("method,pattern", [("wanda", "unstructured"), ("statprune", "2:4"), ("magnitude", "4:8")])
def test_streamed_equals_in_memory_bit_for_bit(checkpoint, tmp_path, method, pattern):
    cfg = StatPruneConfig(method=method, pattern=pattern, sample_tokens=32)
    ids = token_ids(6, 16)
    streamed = StatPruner.from_pretrained(checkpoint, config=cfg, device="cpu")
    assert streamed.prune(ids, output_dir=tmp_path / "streamed", progress=False) == str(tmp_path / "streamed")
    assert streamed._model is None  # the weights were never loaded as a model
    in_memory = StatPruner.from_pretrained(checkpoint, config=cfg, device="cpu")
    in_memory.prune(ids, progress=False)
    in_memory.save_pretrained(tmp_path / "memory")
    _assert_identical(tmp_path / "streamed", tmp_path / "memory")
    ms = json.loads((tmp_path / "streamed" / MANIFEST_NAME).read_text())
    mm = json.loads((tmp_path / "memory" / MANIFEST_NAME).read_text())
    strip = ("created", "pruning_seconds", "model")
    assert {k: v for k, v in ms.items() if k not in strip} == {k: v for k, v in mm.items() if k not in strip}
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed")
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, in_memory.model(ids).logits)
    assert (tmp_path / "streamed" / "tokenizer.json").exists()
    assert not list(tmp_path.glob(".streamed.partial"))


def test_streaming_refuses_non_empty_output(checkpoint, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    pruner = StatPruner.from_pretrained(checkpoint, config=StatPruneConfig(method="magnitude"), device="cpu")
    with pytest.raises(FileExistsError, match="not empty"):
        pruner.prune(output_dir=out)
    assert (out / "keep.txt").read_text() == "precious"


_CRASHING_RUN = textwrap.dedent(
    """
    import os, sys, torch
    sys.path.insert(0, {tests!r})
    from tiny_models import token_ids
    from optimum_statprune import StatPruneConfig, StatPruner
    import optimum_statprune.streaming as streaming

    written = []
    original = streaming.ShardWriter._write

    def write_then_die(self, index, *args):
        original(self, index, *args)
        written.append(index)
        if len(written) == {crash_after}:
            os._exit(9)  # as abrupt as a kill: no cleanup, no finally

    streaming.ShardWriter._write = write_then_die
    cfg = StatPruneConfig(method="wanda", sample_tokens=32)
    StatPruner.from_pretrained({src!r}, config=cfg, device="cpu").prune(token_ids(6, 16), output_dir={out!r}, progress=False)
    """
)


def test_killed_run_resumes_to_identical_tensors(tmp_path):
    src = tmp_path / "src"
    model = build("llama")
    model.config.num_hidden_layers = 4
    model = type(model)(model.config)  # 4 blocks, so there is a middle to die in
    model.save_pretrained(src, max_shard_size="40KB")
    out = tmp_path / "out"
    script = _CRASHING_RUN.format(tests=str(TESTS), src=str(src), out=str(out), crash_after=2)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 9, proc.stderr
    partial = tmp_path / ".out.partial"
    assert not out.exists() and partial.is_dir()  # nothing that looks like a finished model
    state = json.loads((partial / "statprune_state.json").read_text())
    assert sorted(state["blocks"]) == ["0", "1"]

    with pytest.raises(ResumeMismatchError, match="different config"):
        StatPruner.from_pretrained(src, config=StatPruneConfig(method="wanda", sparsity=0.6), device="cpu").prune(
            token_ids(6, 16), output_dir=out, progress=False
        )
    assert partial.is_dir()  # the refusal lost nothing

    cfg = StatPruneConfig(method="wanda", sample_tokens=32)
    StatPruner.from_pretrained(src, config=cfg, device="cpu").prune(token_ids(6, 16), output_dir=out, progress=False)
    assert not partial.exists()
    StatPruner.from_pretrained(src, config=cfg, device="cpu").prune(token_ids(6, 16), output_dir=tmp_path / "ref", progress=False)
    _assert_identical(out, tmp_path / "ref")
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert len(manifest["layers"]) == 4 * 7


_MEMORY_RUN = textwrap.dedent(
    """
    import resource, sys, torch
    sys.path.insert(0, {tests!r})
    from tiny_models import token_ids
    from optimum_statprune import StatPruneConfig, StatPruner
    torch.set_num_threads(1)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    cfg = StatPruneConfig(method="wanda", batch_size=2)
    StatPruner.from_pretrained({src!r}, config=cfg, device="cpu").prune(token_ids(2, 16), output_dir={out!r}, progress=False)
    print(before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    """
)


def test_peak_host_memory_is_bounded_by_a_block(tmp_path):
    """A model of 16 blocks x 32 MiB (fp32) pruned shard to shard: the peak RSS grows by a few blocks'
    worth, far below the 512 MiB of weights."""
    import transformers as tf

    cfg = tf.LlamaConfig(vocab_size=256, hidden_size=1024, intermediate_size=2560, num_hidden_layers=16,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=64)
    src = tmp_path / "src"
    with torch.device("meta"):
        skeleton = tf.LlamaForCausalLM(cfg)
    gen = torch.Generator().manual_seed(0)
    from safetensors.torch import save_file

    weight_map = {}
    for i in range(16):  # written block by block so the test itself never holds the whole model
        prefix = f"model.layers.{i}."
        tensors = {k: torch.randn(v.shape, generator=gen) * 0.02 if v.dim() > 1 else torch.ones(v.shape)
                   for k, v in skeleton.state_dict().items() if k.startswith(prefix)}
        name = f"model-{i + 1:05d}-of-00017.safetensors"
        src.mkdir(exist_ok=True)
        save_file(tensors, src / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
    rest = {k: torch.randn(v.shape, generator=gen) * 0.02 if v.dim() > 1 else torch.ones(v.shape)
            for k, v in skeleton.state_dict().items() if not k.startswith("model.layers.")}
    save_file(rest, src / "model-00017-of-00017.safetensors", metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(rest, "model-00017-of-00017.safetensors"))
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg.save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    del skeleton, tensors, rest

    script = _MEMORY_RUN.format(tests=str(TESTS), src=str(src), out=str(tmp_path / "out"))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    before_kib, peak_kib = (int(v) for v in proc.stdout.split()[-2:])
    weights_mib = 16 * 32 + 2
    growth_mib = (peak_kib - before_kib) / 1024
    assert growth_mib < weights_mib / 3, (growth_mib, weights_mib)
    assert len(_tensors(tmp_path / "out")) == len(weight_map)

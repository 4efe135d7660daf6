"""Shard-to-shard pruning: equal to the in-memory result bit for bit, bounded memory, resumable."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import BUILDERS, build, save_tiny_llama, token_ids
from transformers import AutoModelForCausalLM

from optimum_statprune import StatPruneConfig, StatPruner
from optimum_statprune.checkpoint import shards
from optimum_statprune.engine import streaming
from optimum_statprune.engine.streaming import ResumeMismatchError
from optimum_statprune.sharing.manifest import MANIFEST_NAME

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
        assert ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]), k  # equal alone promotes dtypes


def _assert_streamed_equals_in_memory(src, tmp_path, cfg, device="cpu", **loading) -> None:
    """Prune ``src`` streamed into ``tmp_path/streamed`` and in memory, saved to ``tmp_path/memory``: the
    same tensors, bit for bit and dtype for dtype."""
    ids = token_ids(6, 16)
    StatPruner.from_pretrained(src, config=cfg, device=device, **loading).prune(
        ids, output_dir=tmp_path / "streamed", progress=False)
    in_memory = StatPruner.from_pretrained(src, config=cfg, device=device, **loading)
    in_memory.prune(ids, progress=False)
    in_memory.save_pretrained(tmp_path / "memory")
    _assert_identical(tmp_path / "streamed", tmp_path / "memory")


@pytest.fixture
def checkpoint(tmp_path):
    return save_tiny_llama(tmp_path / "src", "40KB")


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
    strip = ("created", "pruning_seconds", "model", "files")  # shards are split differently; tensors agree
    assert {k: v for k, v in ms.items() if k not in strip} == {k: v for k, v in mm.items() if k not in strip}
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "streamed")
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, in_memory.model(ids).logits)
    assert (tmp_path / "streamed" / "tokenizer.json").exists()
    assert not list(tmp_path.glob(".streamed.partial"))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="float16 GPU kernels need a GPU"))])
@pytest.mark.parametrize("stored,requested", [(torch.float32, torch.float16), (torch.float16, None)])
def test_streamed_runs_and_writes_in_the_dtype_the_in_memory_path_loads(tmp_path, stored, requested, device):
    """A float32 checkpoint pruned with ``dtype=float16``, and a float16 one whose config names no dtype
    (``dtype="auto"`` takes the stored one): the blocks compute in that dtype and every tensor is written in
    it, bit for bit what the in-memory path gives (the skeleton once kept the config's dtype, and the blocks
    silently ran and were written in float32)."""
    build("llama").to(stored).save_pretrained(tmp_path / "src", max_shard_size="40KB")
    if requested is None:
        config_file = tmp_path / "src" / "config.json"
        config_file.write_text(json.dumps({k: v for k, v in json.loads(config_file.read_text()).items() if k != "dtype"}))
    kwargs = {"dtype": requested} if requested is not None else {}
    _assert_streamed_equals_in_memory(tmp_path / "src", tmp_path, StatPruneConfig(method="wanda", sample_tokens=32),
                                      device, **kwargs)
    assert {v.dtype for v in _tensors(tmp_path / "streamed").values()} == {torch.float16}


@pytest.mark.parametrize("arch", sorted(BUILDERS))
def test_every_architecture_streams_bit_for_bit_as_in_memory_in_bfloat16(tmp_path, arch):
    """Every supported architecture, a float32 checkpoint pruned as bfloat16: the streamed output is the
    in-memory prune-and-save, tensor by tensor and dtype by dtype (sliding windows, fused QKV, MoE experts,
    tied embeddings)."""
    build(arch).save_pretrained(tmp_path / "src", max_shard_size="40KB")
    _assert_streamed_equals_in_memory(tmp_path / "src", tmp_path, StatPruneConfig(method="statprune", sample_tokens=32),
                                      dtype=torch.bfloat16)


def test_a_tensor_transformers_keeps_in_float32_is_streamed_in_float32(tmp_path):
    """Dots1 keeps its router in float32 under a half-precision dtype (``_keep_in_fp32_modules_strict``):
    streamed as bfloat16 from a float32 checkpoint, the router's weight is the stored float32 one, as the
    in-memory path loads it, not rounded through bfloat16 (as it once was)."""
    import transformers as tf
    from tiny_models import VOCAB

    torch.manual_seed(0)
    config = tf.Dots1Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, n_routed_experts=4,
                            num_experts_per_tok=2, first_k_dense_replace=1, n_shared_experts=1,
                            max_position_embeddings=256)
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "src", max_shard_size="40KB")
    _assert_streamed_equals_in_memory(tmp_path / "src", tmp_path, StatPruneConfig(method="wanda", sample_tokens=32),
                                      dtype=torch.bfloat16)
    router = "model.layers.1.mlp.gate.weight"
    assert _tensors(tmp_path / "streamed")[router].dtype == torch.float32
    assert torch.equal(_tensors(tmp_path / "streamed")[router], _tensors(tmp_path / "src")[router])


@pytest.mark.parametrize("arch,method,pattern", [("mixtral", "statprune", "unstructured"), ("qwen2_moe", "wanda", "2:4")])
def test_moe_checkpoint_needing_conversion_streams_bit_for_bit(tmp_path, arch, method, pattern):
    """A checkpoint with one tensor per expert (fused by transformers on load) streams block by block: each
    block is converted on read and back on write, so the output has the checkpoint's own keys and equals
    the in-memory prune-and-save bit for bit, manifest included; it verifies, and a killed run resumes."""
    from optimum_statprune.sharing.verify import verify

    src = tmp_path / "src"
    build(arch).save_pretrained(src, max_shard_size="60KB")
    source_keys = set(_tensors(src))
    assert any(".experts.0." in k for k in source_keys)  # per-expert on disk, fused in the model
    cfg = StatPruneConfig(method=method, pattern=pattern, sample_tokens=32)
    ids = token_ids(6, 16)
    StatPruner.from_pretrained(src, config=cfg, device="cpu").prune(ids, output_dir=tmp_path / "streamed", progress=False)
    in_memory = StatPruner.from_pretrained(src, config=cfg, device="cpu")
    in_memory.prune(ids, progress=False)
    in_memory.save_pretrained(tmp_path / "memory")
    _assert_identical(tmp_path / "streamed", tmp_path / "memory")
    assert set(_tensors(tmp_path / "streamed")) == source_keys
    ms = json.loads((tmp_path / "streamed" / MANIFEST_NAME).read_text())
    mm = json.loads((tmp_path / "memory" / MANIFEST_NAME).read_text())
    strip = ("created", "pruning_seconds", "model", "files")  # shards are split differently; tensors agree
    assert {k: v for k, v in ms.items() if k not in strip} == {k: v for k, v in mm.items() if k not in strip}
    assert any(r.get("expert") is not None for r in ms["layers"])
    assert verify(tmp_path / "streamed").ok

    script = _CRASHING_RUN.format(tests=str(TESTS), src=str(src), out=str(tmp_path / "resumed"), crash_after=1, setup="")
    script = script.replace('StatPruneConfig(method="wanda", sample_tokens=32)',
                            f"StatPruneConfig(method={method!r}, pattern={pattern!r}, sample_tokens=32)")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 9, proc.stderr
    StatPruner.from_pretrained(src, config=cfg, device="cpu").prune(ids, output_dir=tmp_path / "resumed", progress=False)
    _assert_identical(tmp_path / "resumed", tmp_path / "memory")


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
    import optimum_statprune.engine.streaming as streaming

    recorded = []
    original = streaming.ShardWriter._record

    def record_then_die(self, index, *args):  # a block is recorded once its shard is durable
        original(self, index, *args)
        recorded.append(index)
        if len(recorded) == {crash_after}:
            os._exit(9)  # as abrupt as a kill: no cleanup, no finally

    streaming.ShardWriter._record = record_then_die
    options = streaming.StreamingOptions({setup})
    cfg = StatPruneConfig(method="wanda", sample_tokens=32)
    StatPruner.from_pretrained({src!r}, config=cfg, device="cpu").prune(token_ids(6, 16), output_dir={out!r}, progress=False,
                                                                       streaming=options)
    """
)


def test_killed_run_resumes_to_identical_tensors(tmp_path):
    src = tmp_path / "src"
    model = build("llama")
    model.config.num_hidden_layers = 4
    model = type(model)(model.config)  # 4 blocks, so there is a middle to die in
    model.save_pretrained(src, max_shard_size="40KB")
    out = tmp_path / "out"
    script = _CRASHING_RUN.format(tests=str(TESTS), src=str(src), out=str(out), crash_after=2, setup="")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 9, proc.stderr
    partial = tmp_path / ".out.partial"
    assert not out.exists() and partial.is_dir()  # nothing that looks like a finished model
    state = json.loads((partial / "statprune_state.json").read_text())
    assert len(state["blocks"]) == 2  # two writer threads may finish blocks out of order
    assert all((partial / entry["shard"]).is_file() for entry in state["blocks"].values())

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
    cfg = StatPruneConfig(method="wanda", batch_size=2)
    peaks = []
    for src, out in ({small!r}, {small_out!r}), ({big!r}, {big_out!r}):
        StatPruner.from_pretrained(src, config=cfg, device="cpu").prune(token_ids(2, 16), output_dir=out, progress=False)
        peaks.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    print(*peaks)
    """
)


def _write_random_llama(directory: Path, n_blocks: int) -> int:
    """A Llama of ``n_blocks`` blocks of 32 MiB (fp32), written shard by shard; returns its tensor count."""
    import transformers as tf
    from safetensors.torch import save_file

    cfg = tf.LlamaConfig(vocab_size=256, hidden_size=1024, intermediate_size=2560, num_hidden_layers=n_blocks,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=64)
    with torch.device("meta"):
        names = tf.LlamaForCausalLM(cfg).state_dict()
    gen = torch.Generator().manual_seed(0)
    directory.mkdir()
    weight_map = {}
    groups = [[k for k in names if k.startswith(f"model.layers.{i}.")] for i in range(n_blocks)]
    groups.append([k for k in names if not k.startswith("model.layers.")])
    for i, keys in enumerate(groups):
        tensors = {k: torch.randn(names[k].shape, generator=gen) * 0.02 if names[k].dim() > 1 else torch.ones(names[k].shape)
                   for k in keys}
        file = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(tensors, directory / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(keys, file))
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    cfg.save_pretrained(directory)
    return len(weight_map)


def test_peak_host_memory_is_bounded_by_a_block(tmp_path):
    """Pruning 16 blocks of 32 MiB shard to shard peaks barely higher than pruning 2 of them in the same
    process (imports and one-off allocations done): memory follows one block, not the model."""
    _write_random_llama(tmp_path / "small", 2)
    n_tensors = _write_random_llama(tmp_path / "big", 16)
    script = _MEMORY_RUN.format(tests=str(TESTS), small=str(tmp_path / "small"), small_out=str(tmp_path / "small-out"),
                                big=str(tmp_path / "big"), big_out=str(tmp_path / "big-out"))
    # glibc raises its mmap threshold to the size of the last freed mapping (up to 32 MiB), after which the
    # pruning's weight-sized temporaries come from the heap and fragment it by chance (the code before the
    # prefetch grew 27-415 MiB here from run to run); a fixed threshold measures what is held, not that.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 20)}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr
    small_kib, big_kib = (int(v) for v in proc.stdout.split()[-2:])
    extra_weights_mib = 14 * 32
    growth_mib = (big_kib - small_kib) / 1024
    assert growth_mib < extra_weights_mib / 3, (growth_mib, extra_weights_mib)
    assert len(_tensors(tmp_path / "big-out")) == n_tensors


def _four_block_checkpoint(directory: Path) -> Path:
    model = build("llama")
    model.config.num_hidden_layers = 4
    model = type(model)(model.config)
    model.save_pretrained(directory, max_shard_size="40KB")  # blocks span several input shards
    return directory


@pytest.mark.parametrize("owl", [False, True])
def test_prefetch_and_writer_threads_give_identical_output(tmp_path, monkeypatch, owl):
    """Prefetch on/off, one or two writer threads, background or inline fsync: the same bytes. With OWL the
    pre-pass reads every original block, then the pruning pass starts again at block 0: every load is still
    served by the prefetch."""
    src = _four_block_checkpoint(tmp_path / "src")
    cfg = StatPruneConfig(method="wanda", sample_tokens=32, owl=owl)
    hits = []
    close = streaming.StreamingBlockStore.close

    def count_hits(self):
        hits.append(self.prefetch_hits)
        close(self)

    monkeypatch.setattr(streaming.StreamingBlockStore, "close", count_hits)
    variants = {"default": "", "legacy": "prefetch=0,writer_threads=1,sync=inline,reuse_write_buffers=0",
                "two-writers": "writer_threads=2,sync=inline", "one-writer": "writer_threads=1"}
    for name, spec in variants.items():
        StatPruner.from_pretrained(src, config=cfg, device="cpu").prune(token_ids(6, 16), output_dir=tmp_path / name,
                                                                       progress=False,
                                                                       streaming=streaming.StreamingOptions.parse(spec))
    loads = 4 * (2 if owl else 1)
    assert hits == [loads, 0, loads, loads]  # block 0 is read while the calibration inputs are captured
    for name in list(variants)[1:]:
        _assert_identical(tmp_path / "default", tmp_path / name)
        a = json.loads((tmp_path / "default" / MANIFEST_NAME).read_text())["layers"]
        b = json.loads((tmp_path / name / MANIFEST_NAME).read_text())["layers"]
        assert [r["sha256"] for r in a] == [r["sha256"] for r in b]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned write buffers need a GPU")
def test_pinned_and_pageable_write_buffers_give_identical_output_on_gpu(tmp_path, monkeypatch):
    src = _four_block_checkpoint(tmp_path / "src")
    cfg = StatPruneConfig(method="statprune", sample_tokens=32)
    for name, pin in (("pinned", True), ("pageable", False)):
        StatPruner.from_pretrained(src, config=cfg, device="cuda").prune(
            token_ids(6, 16), output_dir=tmp_path / name, progress=False,
            streaming=streaming.StreamingOptions(pin_write_buffers=pin))
    _assert_identical(tmp_path / "pinned", tmp_path / "pageable")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA copy streams need a GPU")
def test_streamed_on_gpu_equals_synchronous_copies(tmp_path):
    """On a GPU the prefetch thread copies each block to the device on its own stream, and pruned blocks go
    to pinned buffers on a side stream the host does not wait for. In float16 (Welford's statistics, the
    half-precision layer check): the same bytes with either, both or neither (no prefetch, pageable
    buffers)."""
    src = _four_block_checkpoint(tmp_path / "src")
    cfg = StatPruneConfig(method="statprune", sample_tokens=32)
    ids = token_ids(6, 16)
    variants = {"async": "", "sync": "prefetch=0,pin_write_buffers=0", "sync-store": "pin_write_buffers=0",
                "sync-load": "prefetch=0"}
    for name, spec in variants.items():
        StatPruner.from_pretrained(src, config=cfg, device="cuda", dtype=torch.float16).prune(
            ids, output_dir=tmp_path / name, progress=False, streaming=streaming.StreamingOptions.parse(spec))
    for name in list(variants)[1:]:
        _assert_identical(tmp_path / "async", tmp_path / name)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the CUDA prefetch needs a GPU"))])
def test_each_block_records_the_digest_of_its_source_bytes(tmp_path, monkeypatch, device):
    """What resume compares: each block's recorded source digest is that of the checkpoint's bytes, also on a
    GPU, where the prefetched block goes on to the device while its bytes are still being hashed."""
    from optimum_statprune.checkpoint.resume import combined_digest, tensor_digests

    src = _four_block_checkpoint(tmp_path / "src")
    seen = {}
    submit = streaming.ShardWriter.submit

    def spy(self, index, tensors, hashed, records, release=None, extra=None, ready=None):
        seen[index] = (extra or {}).get("source")
        return submit(self, index, tensors, hashed, records, release=release, extra=extra, ready=ready)

    monkeypatch.setattr(streaming.ShardWriter, "submit", spy)
    StatPruner.from_pretrained(src, config=StatPruneConfig(method="wanda", sample_tokens=32), device=device).prune(
        token_ids(6, 16), output_dir=tmp_path / "out", progress=False)
    reader = shards.CheckpointReader(src)
    keys = streaming._block_keys(reader, "model.layers")
    assert seen == {i: combined_digest(tensor_digests(reader.read(keys[i]))) for i in range(4)}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA copy streams need a GPU")
def test_copies_on_a_side_stream_keep_their_sources_until_done():
    """A block is freed right after its copies are queued, and the next block's work reuses GPU memory at
    once: the copies, held behind a busy stream, must still read the freed block's bytes (the sources are
    kept from reuse until the side stream is done)."""
    named = [(f"w{i}", torch.randn(2048, 2048, device="cuda", dtype=torch.float16)) for i in range(4)]
    expected = {f"b.w{i}": v.cpu() for i, (_, v) in enumerate(named)}
    buffer = torch.empty(streaming._packed_size(named), dtype=torch.uint8, pin_memory=True)
    torch.cuda._sleep(200_000_000)  # the current stream is busy; the side stream's copies wait for it
    out, ready = streaming._pack("b.", named, buffer, torch.cuda.Stream())
    del named
    reuse = [torch.zeros(2048, 2048, device="cuda", dtype=torch.float16) for _ in range(8)]  # would take it
    ready.synchronize()
    assert all(torch.equal(out[k], expected[k]) for k in expected)
    del reuse


def test_host_buffer_pool_prepares_buffers_in_the_background(monkeypatch):
    """``prepare`` allocates on another thread; the first acquires that would allocate wait for those buffers
    instead (so preparing never adds a buffer), released ones are reused first, and a slot that was not
    prepared allocates on demand."""
    import threading

    pool = streaming.HostBufferPool(3)
    made, gate = [], threading.Event()
    empty = torch.empty

    def slow_empty(*args, **kwargs):
        if threading.current_thread().name == "statprune-host-buffers":
            gate.wait(5)  # still allocating when the first acquire comes
        made.append(threading.current_thread().name)
        return empty(*args, **kwargs)

    monkeypatch.setattr(torch, "empty", slow_empty)
    pool.prepare(1000, 2)
    threading.Timer(0.1, gate.set).start()
    a, b = pool.acquire(1000), pool.acquire(900)
    assert a.numel() == b.numel() == 1000 and a.data_ptr() != b.data_ptr()
    assert made == ["statprune-host-buffers"] * 2  # the main thread waited rather than allocating
    pool.release(a)
    assert pool.acquire(1000).data_ptr() == a.data_ptr()
    assert pool.acquire(5000).numel() == 5000 and len(made) == 3  # the third slot: allocated on demand


def test_pinned_write_buffers_are_capped_for_large_blocks():
    """A 7B block (0.4 GB) keeps a buffer per writer thread plus two; a 70B block (1.7 GB) gets one pinned
    buffer; pageable buffers (CPU runs) are not capped."""
    gb = 10**9
    assert streaming.write_buffer_count(2, int(0.4 * gb), pin=True) == 4
    assert streaming.write_buffer_count(2, int(1.7 * gb), pin=True) == 1
    assert streaming.write_buffer_count(1, 5 * gb, pin=True) == 1
    assert streaming.write_buffer_count(2, int(1.7 * gb), pin=False) == 4


def test_host_buffer_pool_reuses_and_bounds_buffers():
    """Released buffers come back before new ones are made; never more than ``count`` exist; a full pool
    makes ``acquire`` wait until one is released; ``reuse=False`` hands out fresh memory each time."""
    import threading

    pool = streaming.HostBufferPool(3)
    a = pool.acquire(100)
    pool.release(a)
    assert pool.acquire(80).data_ptr() == a.data_ptr()  # reused, no second allocation
    b, c = pool.acquire(100), pool.acquire(100)
    assert len({a.data_ptr(), b.data_ptr(), c.data_ptr()}) == 3
    got = []
    waiter = threading.Thread(target=lambda: got.append(pool.acquire(100)))
    waiter.start()
    waiter.join(timeout=0.2)
    assert waiter.is_alive() and not got  # all three in use: acquire waits
    pool.release(b)
    waiter.join(timeout=5)
    assert got and got[0].data_ptr() == b.data_ptr()
    pool.release(c)
    assert pool.acquire(1000).numel() >= 1000  # too small a buffer is replaced by a big enough one

    fresh = streaming.HostBufferPool(1, reuse=False)
    d = fresh.acquire(100)
    fresh.release(d)
    assert fresh.acquire(100).data_ptr() != d.data_ptr()  # d is alive: a new allocation


def test_read_to_host_matches_safetensors(tmp_path):
    from safetensors.torch import save_file

    tensors = {"f16": torch.randn(3, 5).half(), "bf16": torch.randn(7).bfloat16(), "f32": torch.randn(2, 3, 4),
               "i64": torch.arange(5), "bool": torch.tensor([True, False, True]), "scalar": torch.tensor(2.5),
               "empty": torch.zeros(0, 3)}
    save_file(tensors, tmp_path / "t.safetensors")
    read, buffer = shards.read_to_host({tmp_path / "t.safetensors": None})
    assert set(read) == set(tensors)
    for k, v in tensors.items():
        assert read[k].dtype == v.dtype and read[k].shape == v.shape and torch.equal(read[k], v), k
    part, _ = shards.read_to_host({tmp_path / "t.safetensors": ["bf16", "i64"]})
    assert set(part) == {"bf16", "i64"} and torch.equal(part["bf16"], tensors["bf16"])
    assert shards.sha256_in_place(tensors["f32"]) == shards.tensor_sha256(tensors["f32"])


@pytest.mark.parametrize("owl", [False, True])
def test_resume_with_prefetch(tmp_path, monkeypatch, owl):
    """Killed after two blocks were recorded, then resumed with prefetch on: resumed blocks are re-read from
    their output shards (also when a block before them is missing, as when two writers finish out of
    order) and the result equals an uninterrupted run without prefetch."""
    src = _four_block_checkpoint(tmp_path / "src")
    out = tmp_path / "out"
    setup = "prefetch=True, writer_threads=2"
    script = _CRASHING_RUN.format(tests=str(TESTS), src=str(src), out=str(out), crash_after=2, setup=setup)
    if owl:
        script = script.replace('StatPruneConfig(method="wanda", sample_tokens=32)',
                                'StatPruneConfig(method="wanda", sample_tokens=32, owl=True)')
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 9, proc.stderr
    partial = tmp_path / ".out.partial"
    state = json.loads((partial / "statprune_state.json").read_text())
    assert len(state["blocks"]) == 2
    first = min(state["blocks"], key=int)
    del state["blocks"][first]  # a hole: a later block finished, an earlier one did not
    (partial / "statprune_state.json").write_text(json.dumps(state))

    cfg = StatPruneConfig(method="wanda", sample_tokens=32, owl=owl)
    StatPruner.from_pretrained(src, config=cfg, device="cpu").prune(token_ids(6, 16), output_dir=out, progress=False)
    assert not partial.exists()
    StatPruner.from_pretrained(src, config=cfg, device="cpu").prune(token_ids(6, 16), output_dir=tmp_path / "ref",
                                                                   progress=False,
                                                                   streaming=streaming.StreamingOptions(prefetch=False))
    _assert_identical(out, tmp_path / "ref")
    a = json.loads((out / MANIFEST_NAME).read_text())
    b = json.loads((tmp_path / "ref" / MANIFEST_NAME).read_text())
    assert a["layers"] == b["layers"]


def test_a_streamed_run_reports_where_its_time_went(checkpoint, tmp_path):
    """The stages outside the blocks are timed (what ``benchmarks/speed.py`` reports next to the blocks'
    time): each present, none negative, together no more than the whole call."""
    import time

    pruner = StatPruner.from_pretrained(checkpoint, config=StatPruneConfig(method="wanda", sample_tokens=32),
                                        device="cpu")
    start = time.perf_counter()
    pruner.prune(token_ids(6, 16), output_dir=tmp_path / "out", progress=False)
    total = time.perf_counter() - start
    timings = pruner.report.timings
    assert set(timings) == {"setup_s", "outside_s", "capture_s", "blocks_s", "flush_s", "finish_s"}
    assert all(v >= 0 for v in timings.values()) and sum(timings.values()) <= total
    assert timings["blocks_s"] >= pruner.report.seconds * 0.99  # the block loop is inside its stage

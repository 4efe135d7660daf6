"""Reading and writing checkpoints: header validation, the manifest's tensor and file hashes, what resume
trusts, stale partials, N:M widths from the shapes, calibration checks, streaming options."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import build, save_tiny_llama, tiny_tokenizer, token_ids

from optimum_statprune import StatPruneConfig, StatPruner
from optimum_statprune.checkpoint import shards
from optimum_statprune.checkpoint.shards import INDEX_NAME, CheckpointError, tensor_sha256
from optimum_statprune.engine import streaming
from optimum_statprune.engine.streaming import ResumeMismatchError, StreamingOptions
from optimum_statprune.sharing.manifest import MANIFEST_NAME, read_manifest, write_manifest

TESTS = Path(__file__).resolve().parent
WANDA = StatPruneConfig(method="wanda", sample_tokens=32)


# ---------------------------------------------------------------------------------------- headers
def _craft(path: Path, header, data: bytes = b"", length: int | None = None) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes((len(raw) if length is None else length).to_bytes(8, "little") + raw + data)
    return path


def _f32(begin: int, end: int, shape=(2,)) -> dict:
    return {"dtype": "F32", "shape": list(shape), "data_offsets": [begin, end]}


@pytest.mark.parametrize("header,data,length,match", [
    ({"a": _f32(0, 8), "b": _f32(4, 12)}, bytes(12), None, "'b'.*overlaps"),
    ({"a": _f32(-8, 0)}, bytes(8), None, "'a' has invalid data_offsets"),
    ({"a": _f32(0, 8)}, bytes(8), 1 << 40, "header length 1099511627776 does not fit"),
    (b"", b"", 0, "not valid JSON"),
    ({"a": _f32(0, 8), "b": _f32(12, 20)}, bytes(20), None, "'b'.*gap at byte 8"),
    ({"a": _f32(0, 8)}, bytes(12), None, "end at data byte 8 but the file holds 12"),
    ({"a": _f32(0, 8)}, bytes(4), None, "end at data byte 8 but the file holds 4"),
    ({"a": {"dtype": "F33", "shape": [2], "data_offsets": [0, 8]}}, bytes(8), None, "'a' has unknown dtype 'F33'"),
    ({"a": _f32(0, 8, shape=(3,))}, bytes(8), None, r"'a' spans 8 bytes but F32 \[3\] needs 12"),
    ({"a": _f32(0, 8, shape=(-2,))}, bytes(8), None, "'a' has an invalid shape"),
    (b"[1, 2]", b"", None, "not a JSON object"),
    (b"{not json", b"", None, "not valid JSON"),
])
def test_invalid_safetensors_headers_are_one_clear_error(tmp_path, header, data, length, match):
    """Crafted files: overlapping or negative offsets used to be read (the header JSON as weights), a 2^40
    header length was reported as out of memory, an empty header as a bare JSONDecodeError."""
    path = _craft(tmp_path / "bad.safetensors", header, data, length)
    for read in (shards.safetensors_header, lambda p: shards.read_to_host({p: None})):
        with pytest.raises(CheckpointError, match=match) as e:
            read(path)
        assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_an_empty_shard_and_a_broken_index_name_the_file(tmp_path):
    (tmp_path / "empty.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty.safetensors: 0 bytes, too short"):
        shards.safetensors_header(tmp_path / "empty.safetensors")
    (tmp_path / INDEX_NAME).write_text("{")
    with pytest.raises(CheckpointError, match=f"{INDEX_NAME}: not a safetensors index"):
        shards.CheckpointReader(tmp_path)


def test_valid_files_still_read(tmp_path):
    from safetensors.torch import save_file

    tensors = {"x": torch.randn(3, 4), "e": torch.zeros(0), "b": torch.tensor([True]), "h": torch.randn(5).half()}
    save_file(tensors, tmp_path / "ok.safetensors")
    read, _ = shards.read_to_host({tmp_path / "ok.safetensors": None})
    assert all(torch.equal(read[k], v) for k, v in tensors.items())


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="the pinned chunks need a GPU"))])
def test_stored_tensors_read_a_chunk_at_a_time_are_the_stored_ones(tmp_path, monkeypatch, device):
    from safetensors.torch import save_file

    monkeypatch.setattr(shards, "COPY_CHUNK_BYTES", 24)  # several chunks per tensor, a short last one
    tensors = {"x": torch.randn(7, 5), "e": torch.zeros(0), "b": torch.tensor([True, False]),
               "h": torch.randn(13).half(), "i": torch.arange(9)}
    save_file(tensors, tmp_path / "ok.safetensors")
    stored = shards.locate({tmp_path / "ok.safetensors": None})
    assert sorted(t.name for t in stored) == sorted(tensors)
    read = dict(shards.read_tensors(stored, device))
    assert list(read) == [t.name for t in stored]
    for k, got in read.items():
        assert got.device.type == device and got.dtype == tensors[k].dtype
        assert torch.equal(got.cpu(), tensors[k])


@pytest.mark.parametrize("dtype", [None, torch.float16, torch.bfloat16])
def test_a_copy_written_a_chunk_at_a_time_is_a_valid_file_of_the_same_tensors(tmp_path, monkeypatch, dtype):
    """``write_copy`` builds the safetensors file itself: the header validates, safetensors reads it, floating
    tensors are cast (rounded as ``Tensor.to`` rounds), others kept, and each digest is that of the tensor
    as written. Chunks of 24 bytes split every tensor."""
    from safetensors.torch import save_file

    monkeypatch.setattr(shards, "COPY_CHUNK_BYTES", 24)
    a = {"w": torch.randn(7, 5), "ids": torch.arange(11), "mask": torch.tensor([True, False, True])}
    b = {"e": torch.zeros(0, 3), "h": torch.randn(3, 3).half(), "big": torch.randn(40) * 1e3}
    save_file(a, tmp_path / "a.safetensors")
    save_file(b, tmp_path / "b.safetensors")
    stored = shards.locate({tmp_path / "a.safetensors": None, tmp_path / "b.safetensors": ["h", "big", "e"]})
    casts = []
    digests = shards.write_copy(tmp_path / "out.safetensors", stored, {t.name: dtype for t in stored if dtype},
                                cast=lambda chunk, key: casts.append(key) or chunk.to(dtype))
    shards.safetensors_header(tmp_path / "out.safetensors")  # offsets contiguous, sizes match, no trailing bytes
    out = load_file(tmp_path / "out.safetensors")
    expected = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v) for k, v in {**a, **b}.items()}
    assert set(out) == set(expected)
    for k, v in expected.items():
        assert out[k].dtype == v.dtype and torch.equal(out[k], v), k
    assert digests == {k: tensor_sha256(v) for k, v in expected.items()}
    assert set(casts) == {k for k, v in (a | b).items()  # an empty tensor has no chunk to cast
                          if dtype is not None and v.is_floating_point() and v.dtype != dtype and v.numel()}


def test_tensors_outside_the_blocks_are_written_from_the_source_files(checkpoint, tmp_path, monkeypatch):
    """The embedding and ``lm_head`` are copied to the output from the source files (``submit_copy``, a chunk
    at a time), never handed to the writer whole, and the output has them bit for bit."""
    copies = []
    submit = streaming.ShardWriter.submit_copy
    monkeypatch.setattr(streaming.ShardWriter, "submit_copy",
                        lambda self, name, stored, *a, **k: copies.append([t.name for t in stored]) or
                        submit(self, name, stored, *a, **k))
    monkeypatch.setattr(streaming.ShardWriter, "submit_file", lambda *a, **k: pytest.fail("written whole"))
    StatPruner.from_pretrained(checkpoint, config=WANDA, device="cpu").prune(
        token_ids(6, 16), output_dir=tmp_path / "out", progress=False)
    source = shards.CheckpointReader(checkpoint)
    outside = [k for k in source.tensor_names() if not k.startswith("model.layers.")]
    assert copies == [outside] and "lm_head.weight" in outside
    written = shards.CheckpointReader(tmp_path / "out").read(outside)
    assert all(torch.equal(v, written[k]) for k, v in source.read(outside).items())


# ---------------------------------------------------------------------------------------- manifest
@pytest.fixture
def checkpoint(tmp_path):
    return save_tiny_llama(tmp_path / "src", "40KB")


def _saved(directory: Path) -> tuple[dict[str, str], dict[str, int]]:
    index = json.loads((directory / INDEX_NAME).read_text())
    files = sorted(set(index["weight_map"].values()))
    tensors = {k: tensor_sha256(v) for f in files for k, v in load_file(directory / f).items()}
    return tensors, {f: (directory / f).stat().st_size for f in files}


def test_manifest_hashes_every_saved_tensor_and_file(checkpoint, tmp_path):
    """Schema 2: ``tensors`` covers every tensor of every shard (embeddings and norms included, which verify
    ignored), ``files`` every shard the index names, for the streamed and the in-memory save; local paths
    are recorded by their last component only."""
    pruner = StatPruner.from_pretrained(checkpoint, config=WANDA, device="cpu")
    pruner.prune(token_ids(6, 16), output_dir=tmp_path / "streamed", progress=False)
    pruner = StatPruner.from_pretrained(checkpoint, config=WANDA, device="cpu")
    pruner.prune(token_ids(6, 16), progress=False)
    pruner.save_pretrained(tmp_path / "memory", max_shard_size="60KB")
    for out in ("streamed", "memory"):
        manifest = read_manifest(tmp_path / out)
        tensors, files = _saved(tmp_path / out)
        assert manifest["schema_version"] == 2
        assert manifest["tensors"] == tensors and "model.embed_tokens.weight" in tensors
        assert manifest["files"] == files and len(files) > 1
        assert manifest["model"]["name_or_path"] == "src"
        assert str(tmp_path) not in (tmp_path / out / MANIFEST_NAME).read_text()


def test_manifest_sources_are_never_absolute_paths_and_schema_1_still_reads(tmp_path):
    out = tmp_path / "m"
    out.mkdir()
    write_manifest(out, {"schema_version": 1, "model": {"name_or_path": "/home/alice/models/llama-7b"},
                         "evaluation": {"perplexity": {"source": str(tmp_path / "corpus.txt"), "pruned": 9.0}},
                         "calibration": {"source": "org/dataset"}})
    manifest = read_manifest(out)  # an old manifest still reads
    assert manifest["model"]["name_or_path"] == "llama-7b"
    assert manifest["evaluation"]["perplexity"]["source"] == "corpus.txt"
    assert manifest["calibration"]["source"] == "org/dataset"  # a Hub id is kept


# ---------------------------------------------------------------------------------------- resume
_CRASH = textwrap.dedent(
    """
    import os, sys, time
    sys.path.insert(0, {tests!r})
    from tiny_models import token_ids
    from optimum_statprune import StatPruneConfig, StatPruner
    import optimum_statprune.engine.loop as loop
    import optimum_statprune.engine.streaming as streaming

    recorded = []
    original = streaming.ShardWriter._record

    def record_then_die(self, index, *args):
        original(self, index, *args)
        recorded.append(index)
        if len(recorded) == 2:
            os._exit(9)

    streaming.ShardWriter._record = record_then_die
    {prelude}
    StatPruner.from_pretrained({src!r}, config=StatPruneConfig({cfg}), device="cpu").prune(
        token_ids(6, 16), output_dir={out!r}, progress=False, streaming=streaming.StreamingOptions(writer_threads=1))
    """
)


def _four_blocks(directory: Path, seed: int = 0) -> Path:
    model = build("llama", seed)
    model.config.num_hidden_layers = 4
    torch.manual_seed(seed)
    type(model)(model.config).save_pretrained(directory, max_shard_size="40KB")
    return directory


def _crash(src: Path, out: Path, cfg: str = 'method="wanda", sample_tokens=32', prelude: str = "") -> dict:
    script = _CRASH.format(tests=str(TESTS), src=str(src), out=str(out), cfg=cfg, prelude=prelude)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 9, proc.stderr
    return json.loads((out.with_name(f".{out.name}.partial") / "statprune_state.json").read_text())


def _prune(src: Path, out: Path, cfg: StatPruneConfig = WANDA, **kwargs) -> StatPruner:
    pruner = StatPruner.from_pretrained(src, config=cfg, device="cpu")
    pruner.prune(token_ids(6, 16), output_dir=out, progress=False, **kwargs)
    return pruner


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(directory.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _same(a: Path, b: Path) -> bool:
    ta, tb = _weights(a), _weights(b)
    return set(ta) == set(tb) and all(torch.equal(ta[k], tb[k]) for k in ta)


def test_resume_refuses_a_different_checkpoint_with_the_same_names_sizes_and_mtimes(tmp_path):
    """Another model of the same shapes copied over the source, mtimes preserved: the old identity (names,
    sizes, whole-second mtimes) resumed into a mix of both; now refused, and overwrite starts over."""
    src, out = _four_blocks(tmp_path / "src"), tmp_path / "out"
    _crash(src, out)
    other = _four_blocks(tmp_path / "other", seed=1)
    for f in src.glob("*.safetensors"):
        st = f.stat()
        f.write_bytes((other / f.name).read_bytes())
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(ResumeMismatchError, match=r"different source checkpoint.*overwrite \(--overwrite\)"):
        _prune(src, out)
    _prune(src, out, overwrite=True)
    _prune(other, tmp_path / "ref")
    assert _same(out, tmp_path / "ref")


def test_a_changed_finished_shard_is_pruned_again(tmp_path, caplog):
    """A finished block's shard is checked against the digests recorded when it was written (while it is
    read anyway, for the next block's inputs); a flipped byte makes that block be pruned again."""
    src, out = _four_blocks(tmp_path / "src"), tmp_path / "out"
    state = _crash(src, out)
    first, second = sorted(state["blocks"], key=int)
    partial = out.with_name(".out.partial")
    shard = partial / state["blocks"][first]["shard"]
    raw = bytearray(shard.read_bytes())
    raw[-3] ^= 0x40  # a byte of the last tensor's data
    shard.write_bytes(bytes(raw))
    (partial / state["blocks"][second]["shard"]).write_bytes(raw[:100])  # truncated: its header no longer fits
    _prune(src, out)
    assert f"block {first}'s shard" in caplog.text and f"block {second}'s shard" in caplog.text
    _prune(src, tmp_path / "ref")
    assert _same(out, tmp_path / "ref")
    assert read_manifest(out)["tensors"] == read_manifest(tmp_path / "ref")["tensors"]


def test_a_stale_partial_of_other_settings_is_discarded_with_overwrite(tmp_path):
    """The corrected command used to fail with ResumeMismatchError even with overwrite; now overwrite
    discards the stale partial, and without it the error says to pass overwrite."""
    src, out = _four_blocks(tmp_path / "src"), tmp_path / "out"
    _crash(src, out)
    corrected = StatPruneConfig(method="wanda", sample_tokens=32, sparsity=0.6)
    with pytest.raises(ResumeMismatchError, match=r"different config.*pass overwrite \(--overwrite\) to discard"):
        _prune(src, out, corrected)
    _prune(src, out, corrected, overwrite=True)
    assert read_manifest(out)["config"]["sparsity"] == 0.6
    _prune(src, tmp_path / "ref", corrected)
    assert _same(out, tmp_path / "ref")


def test_pruning_seconds_add_up_across_resumed_processes(tmp_path):
    """The killed process's clock runs 100 s per reading, so each of the two blocks it finished took at
    least 100 s; the resumed run's manifest counts them (it used to count only the last process)."""
    src, out = _four_blocks(tmp_path / "src"), tmp_path / "out"
    prelude = ("import itertools, types\n"
               "ticks = itertools.count(0.0, 100.0)\n"
               "streaming.time = types.SimpleNamespace(perf_counter=lambda: next(ticks))")
    state = _crash(src, out, prelude=prelude)
    assert all(entry["seconds"] >= 100 for entry in state["blocks"].values())
    pruner = _prune(src, out)
    assert read_manifest(out)["pruning_seconds"] == pruner.report.seconds >= 200


def test_resume_compares_the_dtype_the_blocks_were_computed_in(tmp_path, caplog):
    """A partial records the dtype its blocks were computed in, as resolved: one begun without ``dtype``
    on a float32 checkpoint resumes with ``dtype=float32`` given (same blocks), one that recorded no dtype
    (as earlier versions did, whose blocks may be in another) is refused, naming it, and another dtype is
    refused too."""
    src, out = _four_blocks(tmp_path / "src"), tmp_path / "out"
    state = _crash(src, out)
    assert state["identity"]["dtype"] == "torch.float32"
    state_file = out.with_name(f".{out.name}.partial") / "statprune_state.json"
    older = json.loads(state_file.read_text())
    older["identity"]["dtype"] = None
    state_file.write_text(json.dumps(older))
    with pytest.raises(ResumeMismatchError, match="dtype"):
        _prune(src, out)
    state_file.write_text(json.dumps(state))
    with pytest.raises(ResumeMismatchError, match="dtype"):
        StatPruner.from_pretrained(src, config=WANDA, device="cpu", dtype=torch.bfloat16).prune(
            token_ids(6, 16), output_dir=out, progress=False)
    with caplog.at_level("INFO", logger="optimum_statprune"):
        StatPruner.from_pretrained(src, config=WANDA, device="cpu", dtype=torch.float32).prune(
            token_ids(6, 16), output_dir=out, progress=False)
    assert "2 of 4 blocks already pruned" in caplog.text
    _prune(src, tmp_path / "whole")
    assert _same(out, tmp_path / "whole")


# ---------------------------------------------------------------------------------------- shapes
def test_nm_widths_are_checked_from_the_shapes_before_any_weight_is_read(checkpoint, tmp_path, monkeypatch):
    """2:3 on 64-wide layers: refused naming a layer and its width, before any tensor is read (streaming)
    and before the model is loaded (in memory); it used to fail after loading, as "an 2:3 pattern"."""
    def no_reads(*args, **kwargs):
        raise AssertionError("weights were read")

    monkeypatch.setattr(streaming, "read_to_host", no_reads)
    monkeypatch.setattr(streaming.CheckpointReader, "read", no_reads)
    cfg = StatPruneConfig(method="magnitude", pattern="2:3")
    pruner = StatPruner.from_pretrained(checkpoint, config=cfg, device="cpu")
    for output_dir in (tmp_path / "out", None):
        with pytest.raises(ValueError, match=r"a 2:3 pattern .* model\.layers\.0\.\S+ has 64 inputs"):
            pruner.prune(output_dir=output_dir)
    assert pruner._model is None
    assert not (tmp_path / ".out.partial").exists() and not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------- calibration
def test_short_or_empty_text_calibration_is_refused_before_any_block(tmp_path):
    from optimum_statprune.data.texts import DataError

    model = build("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = StatPruneConfig(method="wanda", nsamples=8, seqlen=64)
    pruner = StatPruner.from_pretrained(model, config=cfg, tokenizer=tiny_tokenizer(), device="cpu")
    with pytest.raises(DataError, match="hold 0 tokens"):
        pruner.prune(calibration=[""], progress=False)  # crashed inside attention
    with pytest.raises(DataError, match=r"hold 3 tokens in 1 sample.*8 × 64 = 512.*allow_short_calibration=True"):
        pruner.prune(calibration=["a b c"], progress=False)  # pruned on 3 tokens, silently
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    pruner.prune(calibration=["a b c"], progress=False, allow_short_calibration=True)
    pruner.save_pretrained(tmp_path / "out")
    assert read_manifest(tmp_path / "out")["calibration"]["allow_short_calibration"] == {"tokens": 3, "needed": 512}


# ---------------------------------------------------------------------------------------- options
def test_streaming_options_are_one_validated_frozen_value():
    options = StreamingOptions.parse("prefetch=0, writer_threads=1, sync=inline")
    assert options == StreamingOptions(prefetch=False, writer_threads=1, sync="inline")
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.prefetch = True
    with pytest.raises(ValueError, match="sync must be"):
        StreamingOptions(sync="sometimes")
    with pytest.raises(ValueError, match="writer_threads must be"):
        StreamingOptions(writer_threads=3)
    with pytest.raises(ValueError, match="unknown streaming option 'prefetc'"):
        StreamingOptions.parse("prefetc=1")
    assert not hasattr(streaming, "PREFETCH")  # no module-level knobs left to patch


def test_a_partial_that_finished_no_block_never_blocks_a_corrected_run(tmp_path):
    """A run that failed before its first block left nothing worth keeping: a rerun with other settings
    starts over without being told to overwrite; one with finished blocks still needs overwrite."""
    from optimum_statprune.checkpoint.resume import ResumeMismatchError, open_state

    partial = tmp_path / ".out.partial"
    open_state(partial, {"dtype": "float16"}, overwrite=False)
    assert open_state(partial, {"dtype": "float32"}, overwrite=False) == {"identity": {"dtype": "float32"}, "blocks": {}}
    state_file = next(partial.iterdir())
    state = json.loads(state_file.read_text())
    state["blocks"] = {"0": {"layers": []}}
    state_file.write_text(json.dumps(state))
    with pytest.raises(ResumeMismatchError, match="overwrite"):
        open_state(partial, {"dtype": "bfloat16"}, overwrite=False)

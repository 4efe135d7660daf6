"""Prune straight from checkpoint shards to output shards, never holding the whole model in host memory.

The model skeleton is built on the meta device, in the dtype the run computes in (per tensor: float32
where transformers keeps one so); embeddings and other tensors outside the blocks are loaded once for the
capture, and copied to the output from the source files a chunk at a time; each block is read from the
input safetensors to the compute device, pruned, written to its own output shard by a background thread
(which also hashes it), then dropped back to meta. Progress lives in ``.<name>.partial/`` beside the output directory, which is published
(``checkpoint.directories.publish``) only when complete; running the same command again resumes from the
finished blocks, after checking the source and each reused shard (``checkpoint.resume``; what is
guaranteed is in docs/performance.md). The shard writer and its host buffers are in ``checkpoint.writer``.

While block ``i`` computes, a prefetch thread reads the block expected next into host memory and, on a GPU,
copies it from a pinned buffer to the device on its own CUDA stream. A pruned block goes to the writers in
one of a few reused host buffers (pinned for a GPU, filled on a side stream that the host does not wait
for); shards are written by up to two threads without waiting for the disk; a separate thread makes them
durable (fsync of the shards, then of the directory) and only then records the blocks in
``statprune_state.json``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedConfig

from ..checkpoint.atomic import atomic_write_text, fsync_path
from ..checkpoint.directories import check_output, partial_dir, publish
from ..checkpoint.resume import ResumeMismatchError, combined_digest, open_state, tensor_digests
from ..checkpoint.shards import (
    INDEX_NAME,
    CheckpointError,
    CheckpointReader,
    aligned_nbytes,
    locate,
    read_tensors,
    read_to_host,
    shard_name,
)
from ..checkpoint.writer import (
    STATE_NAME,
    HostBufferPool,
    ReadOnlyWriter,
    ShardWriter,
    write_buffer_count,
    writer_threads_for,
)
from ..config import StatPruneConfig
from ..sharing.manifest import build_manifest, pruning_config_block, write_manifest
from ..tensor_math.patterns import PatternError
from .conversion import CheckpointConversion
from .distributed import DistContext, Share
from .loop import (
    BLOCK_CHECK_BATCHES,
    BlockInputs,
    CalibrationBatch,
    PruneReport,
    capture_block_inputs,
    choose_placement,
    prune_blocks,
)
from .prune_step import cast_finite
from .targets import find_blocks, find_targets, hidden_size

logger = logging.getLogger(__name__)

__all__ = ["STATE_NAME", "HostBufferPool", "ResumeMismatchError", "ShardWriter", "StreamingOptions",
           "build_skeleton", "check_pattern_widths", "prune_checkpoint", "write_buffer_count", "writer_threads_for"]


@dataclass(frozen=True)
class StreamingOptions:
    """The I/O knobs of ``prune_checkpoint``; the pruned bytes are identical whatever they are.

    ``prefetch``: read the next block while one computes. ``writer_threads``: 1 or 2 threads writing shards,
    each holding one more block in host memory (``None``: 2 when available host memory exceeds 16 blocks).
    ``sync``: "background" (shards fsynced by a separate thread, batched) or "inline" (each writer fsyncs
    its shard). ``reuse_write_buffers``: carry pruned blocks to the writers in a few reused host buffers
    (False: a fresh one per block). ``pin_write_buffers``: page-lock those buffers when computing on a GPU
    (H200, 7B: 21.5 s vs 23.8 s end to end)."""

    prefetch: bool = True
    writer_threads: int | None = None
    sync: str = "background"
    reuse_write_buffers: bool = True
    pin_write_buffers: bool = True

    def __post_init__(self) -> None:
        if self.sync not in ("background", "inline"):
            raise ValueError(f"StreamingOptions.sync must be 'background' or 'inline', not {self.sync!r}")
        if self.writer_threads is not None and self.writer_threads not in (1, 2):
            raise ValueError(f"StreamingOptions.writer_threads must be 1, 2 or None (auto), not {self.writer_threads!r}")
        for name in ("prefetch", "reuse_write_buffers", "pin_write_buffers"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"StreamingOptions.{name} must be True or False, not {getattr(self, name)!r}")

    @classmethod
    def parse(cls, spec: str) -> StreamingOptions:
        """From ``"prefetch=0,writer_threads=1,sync=inline"`` (benchmarks' ``--variants``)."""
        fields = {f.name for f in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for item in filter(None, (part.strip() for part in spec.split(","))):
            key, _, value = item.partition("=")
            key, value = key.strip().lower(), value.strip()
            if key not in fields:
                raise ValueError(f"unknown streaming option {key!r}; known: {', '.join(sorted(fields))}")
            if key == "writer_threads":
                values[key] = None if value.lower() in ("", "auto", "none") else int(value)
            elif key == "sync":
                values[key] = value
            else:
                values[key] = value.lower() in ("1", "true", "yes", "on")
        return cls(**values)


class _Prefetcher:
    """Reads, on one background thread, the block expected next into host memory: one block at most."""

    def __init__(self):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="statprune-prefetch")
        self._key: tuple[int, bool] | None = None
        self._future = None

    def schedule(self, key: tuple[int, bool], job) -> None:
        self.discard()
        self._key, self._future = key, self._pool.submit(job)

    def take(self, key: tuple[int, bool]) -> dict[str, torch.Tensor] | None:
        """The prefetched tensors if ``key`` is what was prefetched and the read worked, else None."""
        if self._future is None or self._key != key:
            self.discard()
            return None
        future, self._future, self._key = self._future, None, None
        try:
            return future.result()
        except Exception as e:  # the direct read that follows raises it again, or succeeds
            logger.debug("prefetch of block %s failed (%s); reading it directly", key[0], e)
            return None

    def discard(self) -> None:
        """Drop what is prefetched or in flight (waiting for a running read, so memory stays bounded)."""
        if self._future is not None and not self._future.cancel():
            with contextlib.suppress(Exception):
                self._future.result()
        self._future = self._key = None

    def close(self) -> None:
        self.discard()
        self._pool.shutdown()


class StreamingBlockStore:
    """Blocks of a meta-device skeleton, filled from the input checkpoint (or, for blocks a previous run
    already finished, from their output shard) and handed to the writer after pruning.

    With ``prefetch`` each ``load(i)`` starts reading the block expected next (``i + 1``; after the last
    block of an ``original=True`` pass, block 0 of the pruning pass) on a background thread; ``load`` of a
    block that was not prefetched reads it directly. On a CUDA device the prefetch goes into one reused
    pinned buffer and on to the device (one block more in GPU memory), so ``load`` only waits for it."""

    def __init__(self, blocks: nn.ModuleList, blocks_path: str, reader: CheckpointReader, partial: Path,
                 writer: ShardWriter, config: StatPruneConfig, done: set[int],
                 buffers: HostBufferPool, conversion: CheckpointConversion, prefetch: bool = True):
        self.blocks = blocks
        self.blocks_path = blocks_path
        self.reader = reader
        self.partial = partial
        self.writer = writer
        self.config = config
        self.done = done
        self.pending_records: dict[int, list[dict]] = {}
        self.prefetch = prefetch
        self.prefetch_hits = 0
        self.buffers = buffers
        self.conversion = conversion
        self._prefetcher = _Prefetcher() if prefetch else None
        self._staging: torch.Tensor | None = None  # pinned buffer of the CUDA prefetch
        self._copied = None  # CUDA event: the last copy out of the staging buffer is done (the prefetch
        # thread records it and waits for it before it reads the next block into the buffer)
        self._load_stream = None  # the prefetch thread's CUDA stream, for its copies to the device
        self._store_stream = None  # the main thread's, for copies of pruned blocks to host memory
        self._keys_cache: dict[int, list[str]] | None = None
        self._hashers = ThreadPoolExecutor(max_workers=4, thread_name_prefix="statprune-read-hash")
        self._digester = ThreadPoolExecutor(max_workers=1, thread_name_prefix="statprune-read-digest")
        self._hashing: Future | None = None  # the digest of what the staging buffer holds, being computed
        # block -> digest of the source bytes it was pruned from (a Future while it is computed)
        self.source_digests: dict[int, str | Future] = {}
        self.rebuilt: list[int] = []  # finished blocks whose output shard had changed: pruned again
        self._started: dict[int, float] = {}

    def block_keys(self, index: int) -> list[str]:
        if self._keys_cache is None:
            self._keys_cache = _block_keys(self.reader, self.blocks_path)
        return list(self._keys_cache.get(index, []))

    def _output_shard(self, index: int) -> Path:
        return self.partial / self.writer.state["blocks"][str(index)]["shard"]

    def _files(self, index: int, original: bool) -> dict[Path, list[str] | None]:
        if index in self.done and not original:
            return {self._output_shard(index): None}
        return self.source_files(index)

    def source_files(self, index: int) -> dict[Path, list[str] | None]:
        return self.reader.files(self.block_keys(index))

    def _read_safetensors(self, files: dict[Path, list[str] | None]) -> dict[str, torch.Tensor]:
        tensors = {}
        for path, names in files.items():
            with safe_open(path, framework="pt") as f:
                for k in f.keys() if names is None else names:  # noqa: SIM118 (not a dict)
                    tensors[k] = f.get_tensor(k)
        return tensors

    def start(self, index: int, device: torch.device, original: bool = False) -> None:
        """Begin prefetching the block that will be loaded first."""
        if self._prefetcher is not None and 0 <= index < len(self.blocks):
            self._schedule((index, original), torch.device(device))

    def _read(self, index: int, original: bool, device: torch.device,
              prefetching: bool = False) -> tuple[dict[str, torch.Tensor], str | Future | None]:
        """Block ``index``'s tensors on the host, and what their bytes say (hashed on the prefetch thread
        when prefetching, so off the compute's path): for a block to prune, the digest of its source bytes
        (for a CUDA prefetch, a Future: the block goes on to the device while it is hashed); for a block an
        earlier run finished, its output shard is checked against the digests recorded then, and if it
        changed the block is read from the source to be pruned again ("stale")."""
        if index in self.done and not original:
            recorded = self.writer.state["blocks"][str(index)].get("tensors")
            try:
                tensors = self._read_files(self._files(index, original), device, prefetching)
                if recorded is not None and tensor_digests(tensors, self._hashers) == recorded:
                    return tensors, None
                del tensors
            except (CheckpointError, OSError) as e:  # deleted, truncated or rewritten since it was recorded
                logger.debug("block %d's shard is unreadable: %s", index, e)
            tensors = self._read_files(self.source_files(index), device, prefetching)
            return tensors, "stale:" + combined_digest(tensor_digests(tensors, self._hashers))
        tensors = self._read_files(self.source_files(index), device, prefetching)
        if original:
            return tensors, None
        if prefetching and device.type == "cuda":  # copied to the device as soon as read; hashed meanwhile
            self._hashing = self._digester.submit(lambda: combined_digest(tensor_digests(tensors, self._hashers)))
            return tensors, self._hashing
        return tensors, combined_digest(tensor_digests(tensors, self._hashers))

    def _read_files(self, files: dict[Path, list[str] | None], device: torch.device, prefetching: bool) -> dict[str, torch.Tensor]:
        """Read into one buffer: pinned and reused for a CUDA prefetch. (Memory-mapping them instead, as
        safetensors does on a CPU, was ~5% faster there but made the peak RSS erratic, up to four blocks
        higher from run to run.)"""
        try:
            if prefetching and device.type == "cuda":
                if self._copied is not None:
                    self._copied.synchronize()  # the staging buffer's last contents are on the device
                if self._hashing is not None:
                    futures_wait([self._hashing])  # ... and hashed
                tensors, self._staging = read_to_host(files, self._staging, pin=True)
                return tensors
            return read_to_host(files)[0]
        except KeyError:  # a dtype read_to_host does not know: safetensors reads it
            return self._read_safetensors(files)

    def _schedule(self, key: tuple[int, bool], device: torch.device) -> None:
        self._prefetcher.schedule(key, lambda: self._onto(device, *self._read(*key, device, prefetching=True)))

    def _onto(self, device: torch.device, tensors: dict[str, torch.Tensor], note: str | Future | None):
        """On a CUDA device, the prefetched block copied there on the prefetch thread's own stream, while the
        current block computes; returns the tensors, ``note`` and an event that says when they are there
        (None elsewhere: ``load`` copies them)."""
        if device.type != "cuda":
            return tensors, note, None
        if self._load_stream is None:
            self._load_stream = torch.cuda.Stream(device)
        with torch.cuda.stream(self._load_stream):
            moved = {k: v.to(device, non_blocking=True) for k, v in tensors.items()}
        ready = torch.cuda.Event()
        ready.record(self._load_stream)
        self._copied = ready  # the staging buffer is free again once it is done
        return moved, note, ready

    def close(self) -> None:
        if self._prefetcher is not None:
            self._prefetcher.close()
        self._digester.shutdown()
        self._hashers.shutdown()
        self._staging = None

    def load(self, index: int, device: torch.device, original: bool = False) -> nn.Module:
        block = self.blocks[index]
        prefix = f"{self.blocks_path}.{index}."
        device = torch.device(device)
        if not original:
            self._started[index] = time.perf_counter()
        read = self._prefetcher.take((index, original)) if self._prefetcher is not None else None
        if read is not None:
            self.prefetch_hits += 1
            tensors, note, ready = read
        else:
            (tensors, note), ready = self._read(index, original, device), None
        del read
        if isinstance(note, str) and note.startswith("stale:"):
            logger.warning("block %d's shard in %s differs from what the earlier run recorded; pruning it again",
                           index, self.partial)
            self.done.discard(index)  # the loop's ``skip``: block ``index`` is pruned again
            self.rebuilt.append(index)
            note = note[len("stale:"):]
        if note is not None:
            self.source_digests[index] = note
        if ready is not None:  # on the device already, copied on the prefetch thread's stream
            stream = torch.cuda.current_stream(device)
            stream.wait_event(ready)
            for v in tensors.values():
                v.record_stream(stream)  # freed blocks are reused only once this stream is done with them
        elif device.type != "cpu":
            tensors = {k: v.to(device, non_blocking=True) for k, v in tensors.items()}
        if self._prefetcher is not None:
            if index + 1 < len(self.blocks):
                self._schedule((index + 1, original), device)
            elif original:
                self._schedule((0, False), device)  # the pruning pass follows the OWL pre-pass
        tensors = self.conversion.to_model(tensors)  # e.g. per-expert tensors fused, on the device
        dtypes = {prefix + k: v.dtype for k, v in _persistent_tensors(block)}
        if set(tensors) != set(dtypes):
            missing, extra = sorted(set(dtypes) - set(tensors)), sorted(set(tensors) - set(dtypes))
            raise ValueError(
                f"block {index}'s checkpoint tensors do not match the model (missing {missing[:3]}, unexpected "
                f"{extra[:3]}), even after transformers' conversions for this architecture; prune it in memory "
                f"(without output_dir) instead"
            )
        for key, value in tensors.items():  # in the skeleton's dtype (float32 where transformers keeps it)
            value = cast_finite(value, dtypes[key], key)
            set_module_tensor_to_device(block, key[len(prefix):], device, value=value)
        return block

    def store(self, index: int, block: nn.Module) -> None:
        if index not in self.done and self.writer.writes:  # ranks other than 0 never write
            prefix = f"{self.blocks_path}.{index}."
            named = _persistent_tensors(block)
            buffer = self.buffers.acquire(_packed_size(named))
            tensors, ready = _pack(prefix, named, buffer, self._copy_stream(named, buffer))
            targets = find_targets(block, prefix[:-1], self.config.targets, self.config.ignore)
            hashed = {t.name: (t.state_key, t.expert) for t in targets}
            started = self._started.pop(index, None)
            source = self.source_digests.pop(index, None)
            extra = {"source": source.result() if isinstance(source, Future) else source,
                     "seconds": time.perf_counter() - started if started is not None else None}
            self.writer.submit(index, tensors, hashed, self.pending_records.pop(index, []),
                               release=lambda: self.buffers.release(buffer), extra=extra, ready=ready)
        elif not self.writer.writes:  # a rank other than 0: what it kept for the writer is not needed
            self.pending_records.pop(index, None)
            self.source_digests.pop(index, None)
            self._started.pop(index, None)
        block.to("meta")

    def release(self, index: int, block: nn.Module) -> None:
        block.to("meta")

    def _copy_stream(self, named: list[tuple[str, torch.Tensor]], buffer: torch.Tensor):
        """The stream for copying a CUDA block into a pinned buffer without waiting for it (None: copy
        synchronously, as to pageable memory, which the host must wait for anyway)."""
        if not named or not all(v.is_cuda for _, v in named) or not buffer.is_pinned():
            return None
        if self._store_stream is None:
            self._store_stream = torch.cuda.Stream(named[0][1].device)
        return self._store_stream


def _packed_size(named: list[tuple[str, torch.Tensor]]) -> int:
    return sum(aligned_nbytes(v.numel() * v.element_size()) for _, v in named)


def _pack(prefix: str, named: list[tuple[str, torch.Tensor]], buffer: torch.Tensor,
          stream: torch.cuda.Stream | None = None) -> tuple[dict[str, torch.Tensor], torch.cuda.Event | None]:
    """Copies of ``named`` on the host, packed into ``buffer`` (at least ``_packed_size(named)`` bytes).

    With ``stream`` (CUDA tensors, a pinned buffer) the copies are queued on it after the work already
    queued on the current stream, and the host goes on at once, so the GPU does not idle while it copies;
    the returned event says when the bytes are there (the writer waits for it before it hashes them), and
    the caching allocator keeps the source memory until then. Otherwise the copies are done on return."""
    if stream is not None:
        stream.wait_stream(torch.cuda.current_stream(stream.device))
    out, offset = {}, 0
    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        for k, v in named:
            nbytes = v.numel() * v.element_size()
            dst = buffer[offset : offset + nbytes].view(v.dtype).view(v.shape)
            dst.copy_(v.detach(), non_blocking=stream is not None)
            if stream is not None:
                v.record_stream(stream)
            out[prefix + k] = dst
            offset += aligned_nbytes(nbytes)
    if stream is None:
        return out, None
    ready = torch.cuda.Event()
    ready.record(stream)
    return out, ready


def _persistent_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Parameters and persistent buffers by state-dict name."""
    return list(module.state_dict(keep_vars=True).items())


def _load_outside(model: nn.Module, blocks_path: str, reader: CheckpointReader, device: torch.device,
                  dtype: torch.dtype, conversion: CheckpointConversion, writer: ShardWriter, shard: str) -> list[str]:
    """Load every checkpoint tensor outside the blocks into the skeleton on ``device``, in the skeleton's
    dtype (``dtype``, or float32 where transformers keeps a tensor so), and queue them, unchanged but for
    the dtype (tied weights as the checkpoint had them), as the output's ``shard``; returns their keys.
    Read one at a time and written straight from the source files, so host memory holds chunks of them,
    not all of them: an embedding and ``lm_head`` of a large vocabulary are gigabytes each."""
    keys = [k for k in reader.tensor_names() if not k.startswith(blocks_path + ".")]
    skeleton = {k: v.dtype for k, v in _persistent_tensors(model) if not k.startswith(blocks_path + ".")}
    dtypes = {k: skeleton.get(k, dtype) for k in keys}  # a key the conversion renames: the run's dtype

    def cast(value: torch.Tensor, key: str) -> torch.Tensor:
        return cast_finite(value, dtypes[key], key)

    try:
        stored = locate(reader.files(keys))
    except KeyError:  # a dtype read_tensors does not know: safetensors reads them, and they are written whole
        tensors = {k: cast(v, k).contiguous() for k, v in reader.read(keys, "cpu").items()}
        writer.submit_file(shard, tensors)
    else:
        tensors = {k: cast(v, k) for k, v in read_tensors(stored, device)}
        writer.submit_copy(shard, stored, dtypes, cast)
    for key, value in conversion.to_model(tensors).items():
        set_module_tensor_to_device(model, key, device, value=value)
    del tensors
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.device.type == "meta" and not n.startswith(blocks_path + ".")]
    if still_meta:
        raise ValueError(f"the checkpoint lacks tensors the model needs outside its blocks: {still_meta[:5]}")
    return keys


def build_skeleton(source: str | os.PathLike, trust_remote_code: bool = False, dtype: torch.dtype | None = None,
                   config: PreTrainedConfig | None = None) -> nn.Module:
    """The model on the meta device, its floating tensors in ``dtype`` (the config's when None): no weights
    are read or allocated. Checkpoint tensors loaded into it take its dtypes, so the skeleton's dtype is
    the one the blocks compute in. ``config``: ``source``'s, when already loaded."""
    config = config or AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    kwargs = {"dtype": dtype} if dtype is not None else {}
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code, **kwargs)
    model.eval()
    return model


def check_pattern_widths(model: nn.Module, config: StatPruneConfig, blocks: str | None = None) -> None:
    """Refuse an N:M pattern whose M does not divide a targeted layer's input width, from the shapes alone
    (``model`` may be a meta-device skeleton): before any weight is read, not after the first block."""
    nm = config.nm
    if nm is None:
        return
    blocks_path, block_list = find_blocks(model, blocks)
    for i, block in enumerate(block_list):
        for t in find_targets(block, f"{blocks_path}.{i}", config.targets, config.ignore):
            width = t.weight().shape[-1]
            if width % nm[1]:
                raise PatternError(
                    f"a {nm[0]}:{nm[1]} pattern needs every pruned layer's input width to be a multiple of {nm[1]}; "
                    f"{t.name} has {width} inputs (choose an M that divides it, or exclude the layer with ignore)"
                )


def prune_checkpoint(
    source: str | os.PathLike,
    output_dir: str | os.PathLike,
    batches: Sequence[CalibrationBatch],
    config: StatPruneConfig,
    calibration_info: dict[str, Any] | None,
    device: torch.device,
    dtype: torch.dtype | None = None,
    tokenizer: Any = None,
    blocks: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    trust_remote_code: bool = False,
    activations: str = "auto",
    base_model: str | None = None,
    options: StreamingOptions | None = None,
    dist: DistContext | None = None,
) -> PruneReport:
    """Prune the safetensors checkpoint in ``source`` into ``output_dir``, one block at a time.

    ``options`` are the I/O knobs (``StreamingOptions``); the result is bit-identical whatever they are.
    The output is checked (``check_output``) before anything is read, built in ``.<name>.partial`` beside
    it and published with ``publish``; a run killed before that resumes when called again with the same
    arguments, or starts over with ``overwrite`` when they differ.

    With several processes (``dist``) every rank reads each block from the (shared) filesystem and prunes
    it with its share of ``batches``; rank 0 alone checks and resumes the output (its resume state is
    broadcast), writes the shards, the manifest (with the world size) and publishes; every rank returns
    the same report."""
    started = time.perf_counter()
    context = _make_cuda_context(torch.device(device))
    options = options if options is not None else StreamingOptions()
    dist = dist if dist is not None else DistContext()
    output = dist.on_main(lambda: check_output(output_dir, overwrite, source))
    reader = CheckpointReader(source)
    model_config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    dtype = dtype or _auto_dtype(model_config, reader)
    model = build_skeleton(source, trust_remote_code, dtype, model_config)
    blocks_path, block_list = find_blocks(model, blocks)
    check_pattern_widths(model, config, blocks)
    n_blocks = len(block_list)
    total = n_blocks + 1

    partial = partial_dir(output)
    identity = {
        "config": config.resolved(),
        "calibration": calibration_info,
        "checkpoint": reader.fingerprint(),
        "dtype": str(dtype),  # as resolved: a partial whose blocks were computed in another is not resumed
    }
    if dist.active:  # sums in another order: a resume must not mix world sizes
        identity["world_size"] = dist.world_size
    keys = _block_keys(reader, blocks_path)
    state = dist.on_main(lambda: open_state(partial, identity, overwrite, lambda st: _source_changed(st, reader, keys)))
    done = {int(i) for i in state["blocks"]}
    if done:
        logger.info("resuming %s: %d of %d blocks already pruned", output, len(done), n_blocks)

    block_bytes = _packed_size(_persistent_tensors(block_list[0])) if n_blocks else 0  # the skeleton's dtypes
    writer_threads = options.writer_threads
    if writer_threads is None:
        writer_threads = writer_threads_for(block_bytes)
    conversion = CheckpointConversion(model, reader.tensor_names())
    if dist.is_main:
        writer = ShardWriter(partial, total, state, threads=writer_threads, sync=options.sync,
                             to_checkpoint=conversion.to_checkpoint if conversion.active else None)
    else:
        writer = ReadOnlyWriter(state)
    # one buffer more than the writer holds (one per thread, one queued): acquiring one never waits
    pin = options.pin_write_buffers and torch.device(device).type == "cuda"
    buffers = HostBufferPool(write_buffer_count(writer_threads, block_bytes, pin), pin=pin,
                             reuse=options.reuse_write_buffers)
    if buffers.pin and writer.writes and len(done) < n_blocks:
        buffers.prepare(block_bytes, 1)  # the first block's buffer, allocated while block 0 computes
    store = StreamingBlockStore(block_list, blocks_path, reader, partial, writer, config, done, buffers,
                                conversion, prefetch=options.prefetch)
    timings = {"setup_s": time.perf_counter() - started}  # where the time outside the blocks goes
    try:
        store.start(0, device, original=config.owl)  # block 0 is read while the rest is set up
        mark = time.perf_counter()
        if context is not None:
            context.join()
            timings["cuda_wait_s"] = time.perf_counter() - mark
        # everything outside the blocks, written in the background while the blocks are pruned
        outside_keys = _load_outside(model, blocks_path, reader, device, dtype, conversion, writer,
                                     shard_name(n_blocks, total))
        share = None
        if dist.active and config.needs_activations:
            share = Share.of(dist, batches, BLOCK_CHECK_BATCHES)
            batches = [batches[b] for b in share.batches]
        timings["outside_s"], mark = time.perf_counter() - mark, time.perf_counter()
        if config.needs_activations:
            on_host = choose_placement(activations, batches, hidden_size(model), dtype, device)
            inputs = capture_block_inputs(model, blocks_path, block_list, batches, device, on_host)
        else:
            inputs = BlockInputs([], False, [], [], [])
        timings["capture_s"], mark = time.perf_counter() - mark, time.perf_counter()
        report = prune_blocks(store, n_blocks, blocks_path, inputs, config, device, progress, skip=done,
                              on_block_pruned=lambda i, recs: store.pending_records.__setitem__(i, recs),
                              dist=dist, share=share)
        timings["blocks_s"], mark = time.perf_counter() - mark, time.perf_counter()
    finally:
        store.close()
        writer.close()  # every shard durable and recorded
    timings["flush_s"], mark = time.perf_counter() - mark, time.perf_counter()
    if dist.active:
        dist.barrier()  # every rank is done reading the partial directory before rank 0 publishes it
        report = dist.on_main(lambda: _finish(partial, output, state, report, done, n_blocks, total, outside_keys,
                                                writer, model, dtype, config, base_model, tokenizer, calibration_info,
                                                source, dist.world_size))
    else:
        report = _finish(partial, output, state, report, done, n_blocks, total, outside_keys, writer, model, dtype,
                         config, base_model, tokenizer, calibration_info, source, 1)
    timings["finish_s"] = time.perf_counter() - mark
    report.timings = timings
    return report


def _finish(partial, output, state, report, done, n_blocks, total, outside_keys, writer, model, dtype, config,
            base_model, tokenizer, calibration_info, source, world_size: int) -> PruneReport:
    """The index, configs, tokenizer and manifest beside the shards, then the publish."""
    report.layers = [rec for i in range(n_blocks) for rec in state["blocks"][str(i)]["layers"]]
    # the time of the blocks earlier processes finished, plus this process's (a rebuilt block counts once)
    report.seconds += sum(state["blocks"][str(i)].get("seconds") or 0.0 for i in done)

    outside_shard = shard_name(n_blocks, total)
    weight_map = dict.fromkeys(outside_keys, outside_shard)
    tensors = dict(writer.file_digests[outside_shard])
    for i in range(n_blocks):
        entry = state["blocks"][str(i)]
        weight_map.update(dict.fromkeys(entry["keys"], entry["shard"]))
        tensors.update(entry["tensors"])
    files = {f: os.path.getsize(partial / f) for f in sorted(set(weight_map.values()))}
    index = {"metadata": {"total_size": sum(files.values())}, "weight_map": weight_map}
    atomic_write_text(partial / INDEX_NAME, json.dumps(index, indent=2))
    model.config.dtype = dtype
    model.config.pruning_config = pruning_config_block(config.resolved(), base_model)
    model.config.save_pretrained(partial)
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(partial)
    if tokenizer is not None:
        tokenizer.save_pretrained(partial)
    config.save_pretrained(partial)
    info = {"name_or_path": base_model or str(source), "architecture": type(model).__name__,
            "dtype": str(dtype)}
    write_manifest(partial, build_manifest(config.resolved(), report.layers, calibration_info, info, report.seconds,
                                           report.owl, tensors=tensors, files=files, world_size=world_size),
                   published=False)
    (partial / STATE_NAME).unlink()
    for f in partial.iterdir():  # the small files (config, tokenizer, manifest); shards are durable already
        if f.is_file() and f.name not in files:
            fsync_path(f)
    publish(partial, output)
    return report


def _make_cuda_context(device: torch.device) -> threading.Thread | None:
    """Make ``device``'s CUDA context on a thread of its own, so that its cost overlaps building the
    skeleton and opening the output rather than delaying the first read to the GPU. Errors are left to
    the first real use, which reports them."""
    if device.type != "cuda" or torch.cuda.is_initialized():
        return None

    def make() -> None:
        with contextlib.suppress(Exception):
            torch.empty(0, device=device)

    thread = threading.Thread(target=make, name="statprune-cuda-context", daemon=True)
    thread.start()
    return thread


def _auto_dtype(config: PreTrainedConfig, reader: CheckpointReader) -> torch.dtype:
    """The dtype ``from_pretrained(dtype="auto")`` loads the checkpoint in, as the in-memory path does: the
    config's, else the first floating dtype stored, else float32."""
    named = getattr(config, "dtype", None)
    if isinstance(named, str):
        named = getattr(torch, named)
    return named or reader.stored_dtype() or torch.float32


def _block_keys(reader: CheckpointReader, blocks_path: str) -> dict[int, list[str]]:
    keys: dict[int, list[str]] = {}
    prefix = blocks_path + "."
    for k in reader.tensor_names():
        if k.startswith(prefix):
            head = k[len(prefix):].split(".", 1)[0]
            if head.isdigit():
                keys.setdefault(int(head), []).append(k)
    return keys


def _source_changed(state: dict[str, Any], reader: CheckpointReader, keys: dict[int, list[str]]) -> str | None:
    """Whether the source's bytes differ from what the unfinished run read: the first finished block is read
    again and its digest compared (one block's read, only when resuming). Headers and sizes are compared by
    the identity's fingerprint; this catches a different checkpoint of the same shapes."""
    first = min(state["blocks"], key=int)
    recorded = state["blocks"][first].get("source")
    if recorded is None:
        return "no record of its source's bytes"
    try:
        tensors = read_to_host(reader.files(keys.get(int(first), [])))[0]
    except KeyError:  # a dtype read_to_host does not know
        tensors = reader.read(keys.get(int(first), []))
    if combined_digest(tensor_digests(tensors)) != recorded:
        return f"a different source checkpoint (block {first}'s weights differ)"
    return None

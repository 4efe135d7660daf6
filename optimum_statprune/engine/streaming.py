"""Prune straight from checkpoint shards to output shards, never holding the whole model in host memory.

The model skeleton is built on the meta device; embeddings and other tensors outside the blocks are
loaded once for the capture; each block is read from the input safetensors to the compute device,
pruned, written to its own output shard by a background thread (which also hashes it), then dropped
back to meta. Progress lives in ``.<name>.partial/`` beside the output directory, which is renamed into
place only when complete; running the same command again resumes from the last finished block.

While block ``i`` computes, a prefetch thread reads the block expected next into host memory (pinned when
the compute device is a GPU, so ``load`` only issues an asynchronous host-to-device copy). A pruned block
goes to the writers in one of a few reused host buffers (pinned for a GPU); shards are written by up to
two threads without waiting for the disk; a separate thread makes them durable (fsync of
the shards, then of the directory) and only then records the blocks in ``statprune_state.json``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import shutil
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from ..checkpoint.atomic import atomic_write_text, fsync_path
from ..checkpoint.shards import (
    INDEX_NAME,
    CheckpointReader,
    aligned_nbytes,
    read_to_host,
    sha256_in_place,
    shard_name,
)
from ..config import StatPruneConfig
from ..sharing.manifest import build_manifest, pruning_config_block, write_manifest
from .conversion import CheckpointConversion
from .loop import (
    BlockInputs,
    CalibrationBatch,
    PruneReport,
    _hidden_size,
    capture_block_inputs,
    choose_placement,
    prune_blocks,
)
from .targets import find_blocks, find_targets

logger = logging.getLogger(__name__)

STATE_NAME = "statprune_state.json"

# Defaults of prune_checkpoint's I/O knobs (module attributes so that benchmarks can A/B them).
PREFETCH = True
WRITER_THREADS: int | None = None  # None: 2 when host memory allows, else 1
SYNC = "background"  # or "inline": fsync each shard in its writer thread (the behaviour before 0.1.x)
REUSE_WRITE_BUFFERS = True  # False: a fresh host buffer per block on its way to the writer (the old behaviour)
PIN_WRITE_BUFFERS = True  # pinned when the compute device is a GPU (H200, 7B: 21.5 s vs 23.8 s end to end)



class ResumeMismatchError(ValueError):
    """An unfinished run with different settings occupies the output's partial directory."""


def _available_host_memory() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def writer_threads_for(block_bytes: int) -> int:
    """2 writer threads when host memory has room for many more blocks than they hold, else 1."""
    available = _available_host_memory()
    return 2 if available is not None and available > 16 * block_bytes else 1


class HostBufferPool:
    """Host buffers that carry pruned blocks to the writer threads, reused from block to block.

    A freshly allocated buffer costs a page fault per 4 KiB on first touch, on the thread that fills it:
    for a 400 MB block that is a few tenths of a second of the main thread per block, which the GPU then
    waits for. Reusing ``count`` buffers pays that once per buffer. ``acquire`` blocks while all of them
    are in use, which is what bounds host memory. ``pin`` page-locks them for a GPU: its copies to
    pinned memory skip the driver's bounce buffer (torch's pinned allocator rounds each buffer up to a
    power of two). ``reuse=False`` allocates afresh every time (the old behaviour, for comparison)."""

    def __init__(self, count: int, pin: bool = False, reuse: bool = True):
        self.pin = pin
        self.reuse = reuse
        # last in, first out: a released buffer is reused before a placeholder makes a new one, so no more
        # buffers are allocated than were ever in use at once
        self._free: queue.LifoQueue = queue.LifoQueue()
        for _ in range(count):
            self._free.put(None)

    def acquire(self, nbytes: int) -> torch.Tensor:
        buffer = self._free.get()
        if buffer is None or not self.reuse or buffer.numel() < nbytes:
            buffer = None  # the old one goes before the new one is allocated
            buffer = torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=self.pin)
        return buffer

    def release(self, buffer: torch.Tensor | None) -> None:
        self._free.put(buffer if self.reuse else None)


class ShardWriter:
    """Writes one shard per block from background threads, hashing the targeted tensors in parallel, and
    records each block in the state file once its shard is durable, so a crash loses at most the blocks in
    flight. At most ``threads + max_pending`` blocks wait in it (one more is being filled in the
    ``HostBufferPool`` that carries them).

    ``sync="background"``: writer threads only write (to the page cache) and rename; one more thread fsyncs
    whatever shards have been written since its last round, then the directory, then records those blocks.
    ``sync="inline"``: each writer thread fsyncs its own shard before recording it. Either way a block is in
    ``statprune_state.json`` only after its shard and the rename are on disk."""

    def __init__(self, partial: Path, total_shards: int, state: dict[str, Any], threads: int = 1, max_pending: int = 1,
                 sync: str = "background", to_checkpoint=None):
        if sync not in ("background", "inline"):
            raise ValueError(f"sync must be 'background' or 'inline', not {sync!r}")
        self.partial = partial
        self.total = total_shards
        self.state = state
        self.sync = sync
        self.to_checkpoint = to_checkpoint  # model-format block tensors -> the checkpoint's keys and layouts
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._written: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._hashers = ThreadPoolExecutor(max_workers=8, thread_name_prefix="statprune-hash")
        self._error: BaseException | None = None
        self._threads = [
            threading.Thread(target=self._run, name=f"statprune-writer-{i}", daemon=True) for i in range(threads)
        ]
        for t in self._threads:
            t.start()
        self._syncer = threading.Thread(target=self._sync_run, name="statprune-sync", daemon=True)
        self._syncer.start()

    def submit(self, index: int, tensors: dict[str, torch.Tensor], hashed: dict[str, tuple[str, int | None]],
               records: list[dict], release=None) -> None:
        """Queue block ``index``'s shard; ``release()`` is called once ``tensors`` are no longer read."""
        self._raise()
        self._queue.put((index, tensors, hashed, records, release))

    def submit_file(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Write (and make durable) a shard that is not a block, e.g. the tensors outside the blocks."""
        self._raise()
        self._queue.put((name, tensors))

    def close(self) -> None:
        """Wait until every submitted shard is written, durable and recorded."""
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads:
            t.join()
        self._written.put(None)
        self._syncer.join()
        self._hashers.shutdown()
        self._raise()

    def _raise(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"writing a shard failed: {self._error}") from self._error

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            release = item[4] if len(item) == 5 else None
            try:
                if self._error is not None:
                    pass  # after a failure, queued blocks are dropped (the error surfaces on close)
                elif len(item) == 2:
                    self._write_file(*item)
                else:
                    self._write(*item[:4])
            except BaseException as e:  # surfaced on the next submit/close
                self._error = e
            item = None  # the block's host memory goes now, not at the next get()
            if release is not None:
                release()

    def _save(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        tmp = self.partial / f".{name}.tmp"
        save_file(tensors, tmp, metadata={"format": "pt"})
        if self.sync == "inline":
            fsync_path(tmp)
        os.replace(tmp, self.partial / name)

    def _write_file(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        self._save(name, tensors)
        if self.sync == "inline":
            fsync_path(self.partial, directory=True)
        else:
            self._written.put((None, name, None))

    def _write(self, index: int, tensors: dict[str, torch.Tensor], hashed: dict[str, tuple[str, int | None]], records: list[dict]) -> None:
        name = shard_name(index, self.total)
        digests = {}
        for rec in records:
            key, expert = hashed[rec["name"]]
            t = tensors[key] if expert is None else tensors[key][expert]
            rec["tensor"] = key
            digests[rec["name"]] = self._hashers.submit(sha256_in_place, t)
        if self.to_checkpoint is not None:  # hashed as the model holds it, written as the checkpoint had it
            tensors = self.to_checkpoint(tensors)
        self._save(name, tensors)
        for rec in records:
            rec["sha256"] = digests[rec["name"]].result()
        entry = {"shard": name, "keys": sorted(tensors), "layers": records}
        if self.sync == "inline":
            fsync_path(self.partial, directory=True)
            self._record(index, entry)
        else:
            self._written.put((index, name, entry))

    def _sync_run(self) -> None:
        """Background durability: each round fsyncs every shard written since the last, then the directory
        (the renames), and only then records those blocks."""
        stop = False
        while not stop:
            items = [self._written.get()]
            while True:
                try:
                    items.append(self._written.get_nowait())
                except queue.Empty:
                    break
            stop = None in items
            items = [it for it in items if it is not None]
            if not items or self._error is not None:
                continue
            try:
                for _, name, _ in items:
                    fsync_path(self.partial / name)
                fsync_path(self.partial, directory=True)
                for index, _, entry in items:
                    if index is not None:
                        self._record(index, entry)
            except BaseException as e:
                self._error = e

    def _record(self, index: int, entry: dict[str, Any]) -> None:
        """Mark block ``index`` finished; called only once its shard is durable."""
        with self._lock:
            self.state["blocks"][str(index)] = entry
            atomic_write_text(self.partial / STATE_NAME, json.dumps(self.state, indent=1) + "\n")


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
    pinned buffer and ``load`` copies from it asynchronously."""

    def __init__(self, blocks: nn.ModuleList, blocks_path: str, reader: CheckpointReader, partial: Path,
                 dtype: torch.dtype | None, writer: ShardWriter, config: StatPruneConfig, done: set[int],
                 buffers: HostBufferPool, conversion: CheckpointConversion, prefetch: bool = True):
        self.blocks = blocks
        self.blocks_path = blocks_path
        self.reader = reader
        self.partial = partial
        self.dtype = dtype
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
        self._copied = None  # CUDA event: the last copy out of the staging buffer is done (set before the
        # next prefetch is scheduled, read by that prefetch)
        self._keys_cache: dict[int, list[str]] | None = None

    def block_keys(self, index: int) -> list[str]:
        if self._keys_cache is None:
            self._keys_cache = {}
            prefix = self.blocks_path + "."
            for k in self.reader.tensor_names():
                if k.startswith(prefix):
                    head = k[len(prefix):].split(".", 1)[0]
                    if head.isdigit():
                        self._keys_cache.setdefault(int(head), []).append(k)
        return list(self._keys_cache.get(index, []))

    def _output_shard(self, index: int) -> Path:
        return self.partial / self.writer.state["blocks"][str(index)]["shard"]

    def _files(self, index: int, original: bool) -> dict[Path, list[str] | None]:
        if index in self.done and not original:
            return {self._output_shard(index): None}
        return self.reader.files(self.block_keys(index))

    def _read_safetensors(self, index: int, original: bool) -> dict[str, torch.Tensor]:
        tensors = {}
        for path, names in self._files(index, original).items():
            with safe_open(path, framework="pt") as f:
                for k in f.keys() if names is None else names:  # noqa: SIM118 (not a dict)
                    tensors[k] = f.get_tensor(k)
        return tensors

    def start(self, index: int, device: torch.device, original: bool = False) -> None:
        """Begin prefetching the block that will be loaded first."""
        if self._prefetcher is not None and 0 <= index < len(self.blocks):
            self._schedule((index, original), torch.device(device))

    def _read(self, index: int, original: bool, device: torch.device, prefetching: bool = False) -> dict[str, torch.Tensor]:
        """Block ``index``'s tensors on the host, read into one buffer: pinned and reused for a CUDA prefetch.
        (Memory-mapping them instead, as safetensors does on a CPU, was ~5% faster there but made the peak
        RSS erratic, up to four blocks higher from run to run.)"""
        files = self._files(index, original)
        try:
            if prefetching and device.type == "cuda":
                if self._copied is not None:
                    self._copied.synchronize()  # the staging buffer's last contents are on the device
                tensors, self._staging = read_to_host(files, self._staging, pin=True)
                return tensors
            return read_to_host(files)[0]
        except KeyError:  # a dtype read_to_host does not know: safetensors reads it
            return self._read_safetensors(index, original)

    def _schedule(self, key: tuple[int, bool], device: torch.device) -> None:
        self._prefetcher.schedule(key, lambda: self._read(*key, device, prefetching=True))

    def close(self) -> None:
        if self._prefetcher is not None:
            self._prefetcher.close()
        self._staging = None

    def load(self, index: int, device: torch.device, original: bool = False) -> nn.Module:
        block = self.blocks[index]
        prefix = f"{self.blocks_path}.{index}."
        device = torch.device(device)
        tensors = self._prefetcher.take((index, original)) if self._prefetcher is not None else None
        if tensors is not None:
            self.prefetch_hits += 1
        else:
            tensors = self._read(index, original, device)
        if device.type != "cpu":
            tensors = {k: v.to(device, non_blocking=True) for k, v in tensors.items()}
            if device.type == "cuda":
                self._copied = torch.cuda.Event()  # the prefetch waits for it before reusing its buffer
                self._copied.record(torch.cuda.current_stream(device))
        if self._prefetcher is not None:
            if index + 1 < len(self.blocks):
                self._schedule((index + 1, original), device)
            elif original:
                self._schedule((0, False), device)  # the pruning pass follows the OWL pre-pass
        tensors = self.conversion.to_model(tensors)  # e.g. per-expert tensors fused, on the device
        expected = {prefix + k for k, _ in _persistent_tensors(block)}
        if set(tensors) != expected:
            missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
            raise ValueError(
                f"block {index}'s checkpoint tensors do not match the model (missing {missing[:3]}, unexpected "
                f"{extra[:3]}), even after transformers' conversions for this architecture; prune it in memory "
                f"(without output_dir) instead"
            )
        for key, value in tensors.items():
            if self.dtype is not None and value.is_floating_point():
                value = value.to(self.dtype)
            set_module_tensor_to_device(block, key[len(prefix):], device, value=value)
        return block

    def store(self, index: int, block: nn.Module) -> None:
        if index not in self.done:
            prefix = f"{self.blocks_path}.{index}."
            named = _persistent_tensors(block)
            buffer = self.buffers.acquire(_packed_size(named))
            tensors = _pack(prefix, named, buffer)
            targets = find_targets(block, prefix[:-1], self.config.targets, self.config.ignore)
            hashed = {t.name: (t.state_key, t.expert) for t in targets}
            self.writer.submit(index, tensors, hashed, self.pending_records.pop(index, []),
                               release=lambda: self.buffers.release(buffer))
        block.to("meta")

    def release(self, index: int, block: nn.Module) -> None:
        block.to("meta")


def _packed_size(named: list[tuple[str, torch.Tensor]]) -> int:
    return sum(aligned_nbytes(v.numel() * v.element_size()) for _, v in named)


def _pack(prefix: str, named: list[tuple[str, torch.Tensor]], buffer: torch.Tensor) -> dict[str, torch.Tensor]:
    """Copies of ``named`` on the host, packed into ``buffer`` (at least ``_packed_size(named)`` bytes)."""
    out, offset = {}, 0
    for k, v in named:
        nbytes = v.numel() * v.element_size()
        dst = buffer[offset : offset + nbytes].view(v.dtype).view(v.shape)
        dst.copy_(v.detach())
        out[prefix + k] = dst
        offset += aligned_nbytes(nbytes)
    return out


def _persistent_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Parameters and persistent buffers by state-dict name."""
    return list(module.state_dict(keep_vars=True).items())


def _load_outside(model: nn.Module, blocks_path: str, reader: CheckpointReader, device: torch.device,
                  dtype, conversion: CheckpointConversion) -> dict[str, torch.Tensor]:
    """Load every checkpoint tensor outside the blocks into the skeleton; return them as read (on the host,
    in ``dtype``), for the output's last shard."""
    keys = [k for k in reader.tensor_names() if not k.startswith(blocks_path + ".")]
    tensors = {}
    for key, value in reader.read(keys, "cpu").items():
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        tensors[key] = value.contiguous()
    for key, value in conversion.to_model(tensors).items():
        set_module_tensor_to_device(model, key, device, value=value)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.device.type == "meta" and not n.startswith(blocks_path + ".")]
    if still_meta:
        raise ValueError(f"the checkpoint lacks tensors the model needs outside its blocks: {still_meta[:5]}")
    return tensors


def build_skeleton(source: str | os.PathLike, trust_remote_code: bool = False) -> nn.Module:
    """The model on the meta device: no weights are read or allocated."""
    config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    model.eval()
    return model


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
    prefetch: bool | None = None,
    writer_threads: int | None = None,
    sync: str | None = None,
) -> PruneReport:
    """Prune the safetensors checkpoint in ``source`` into ``output_dir``, one block at a time.

    I/O knobs (``None``: the module defaults ``PREFETCH``, ``WRITER_THREADS``, ``SYNC``): ``prefetch`` reads
    the next block while one computes; ``writer_threads`` (1 or 2; ``None`` picks 2 when available host
    memory exceeds 16 blocks) write shards in parallel, each holding one more block in host memory;
    ``sync`` is "background" (shards fsynced by a separate thread, batched) or "inline" (each writer fsyncs
    its shard). The result is bit-identical whatever they are."""
    prefetch = PREFETCH if prefetch is None else prefetch
    writer_threads = WRITER_THREADS if writer_threads is None else writer_threads
    sync = SYNC if sync is None else sync
    output = Path(output_dir)
    if output.exists() and any(output.iterdir()) and not overwrite:
        raise FileExistsError(f"{output} is not empty; choose another directory or pass overwrite=True")
    reader = CheckpointReader(source)
    model = build_skeleton(source, trust_remote_code)
    blocks_path, block_list = find_blocks(model, blocks)
    n_blocks = len(block_list)
    total = n_blocks + 1

    partial = output.with_name(f".{output.name}.partial")
    identity = {
        "config": config.resolved(),
        "calibration": calibration_info,
        "checkpoint": reader.fingerprint(),
        "dtype": str(dtype) if dtype is not None else None,
    }
    state = _open_state(partial, identity)
    done = {int(i) for i in state["blocks"]}
    if done:
        logger.info("resuming %s: %d of %d blocks already pruned", output, len(done), n_blocks)

    if writer_threads is None:
        itemsize = dtype.itemsize if dtype is not None else None
        block_bytes = sum(p.numel() * (itemsize if itemsize and p.is_floating_point() else p.element_size())
                          for _, p in _persistent_tensors(block_list[0])) if n_blocks else 0
        writer_threads = writer_threads_for(block_bytes)
    conversion = CheckpointConversion(model, reader.tensor_names())
    writer = ShardWriter(partial, total, state, threads=writer_threads, sync=sync,
                         to_checkpoint=conversion.to_checkpoint if conversion.active else None)
    # one buffer more than the writer holds (one per thread, one queued): acquiring one never waits
    buffers = HostBufferPool(writer_threads + 2, pin=PIN_WRITE_BUFFERS and torch.device(device).type == "cuda",
                             reuse=REUSE_WRITE_BUFFERS)
    store = StreamingBlockStore(block_list, blocks_path, reader, partial, dtype, writer, config, done, buffers,
                                conversion, prefetch=prefetch)
    try:
        store.start(0, device, original=config.owl)  # block 0 is read while the rest is set up
        outside_tensors = _load_outside(model, blocks_path, reader, device, dtype, conversion)
        # everything outside the blocks, copied through unchanged (tied weights stay as the checkpoint had
        # them), written in the background while the blocks are pruned
        outside_keys = list(outside_tensors)
        writer.submit_file(shard_name(n_blocks, total), outside_tensors)
        del outside_tensors
        if config.needs_activations:
            dt = dtype or model.get_input_embeddings().weight.dtype
            on_host = choose_placement(activations, batches, _hidden_size(model), dt, device)
            inputs = capture_block_inputs(model, blocks_path, block_list, batches, device, on_host)
        else:
            inputs = BlockInputs([], False, [], [], [])
        report = prune_blocks(store, n_blocks, blocks_path, inputs, config, device, progress, skip=done,
                              on_block_pruned=lambda i, recs: store.pending_records.__setitem__(i, recs))
    finally:
        store.close()
        writer.close()  # every shard durable and recorded
    report.layers = [rec for i in range(n_blocks) for rec in state["blocks"][str(i)]["layers"]]

    weight_map = dict.fromkeys(outside_keys, shard_name(n_blocks, total))
    for i in range(n_blocks):
        entry = state["blocks"][str(i)]
        weight_map.update(dict.fromkeys(entry["keys"], entry["shard"]))
    total_size = sum(os.path.getsize(partial / f) for f in set(weight_map.values()))
    atomic_write_text(partial / INDEX_NAME, json.dumps({"metadata": {"total_size": total_size}, "weight_map": weight_map}, indent=2))
    if dtype is not None:
        model.config.dtype = dtype
    model.config.pruning_config = pruning_config_block(config.resolved(), base_model)
    model.config.save_pretrained(partial)
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(partial)
    if tokenizer is not None:
        tokenizer.save_pretrained(partial)
    config.save_pretrained(partial)
    info = {"name_or_path": str(source), "architecture": type(model).__name__, "dtype": str(dtype or model.config.dtype)}
    write_manifest(partial, build_manifest(config.resolved(), report.layers, calibration_info, info, report.seconds, report.owl))
    (partial / STATE_NAME).unlink()
    shards = set(weight_map.values())
    for f in partial.iterdir():  # the small files (config, tokenizer, manifest); shards are durable already
        if f.is_file() and f.name not in shards:
            fsync_path(f)
    fsync_path(partial, directory=True)
    if output.exists():
        shutil.rmtree(output)
    os.replace(partial, output)
    fsync_path(output.parent, directory=True)
    return report


def _open_state(partial: Path, identity: dict[str, Any]) -> dict[str, Any]:
    state_file = partial / STATE_NAME
    if state_file.is_file():
        state = json.loads(state_file.read_text())
        if state.get("identity") != identity:
            changed = sorted(k for k in identity if state.get("identity", {}).get(k) != identity[k])
            raise ResumeMismatchError(
                f"{partial} holds an unfinished run with a different {', '.join(changed)}; rerun with the same "
                f"settings to resume, or delete {partial} to start over"
            )
        return state
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    state = {"identity": identity, "blocks": {}}
    atomic_write_text(state_file, json.dumps(state, indent=1) + "\n")
    return state

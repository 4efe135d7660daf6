"""Writing a pruned checkpoint shard by shard: reused host buffers that carry blocks to background writer
threads, which write one shard per block, hash every tensor they write, and record each block in the
resume state only once its shard is durable."""

from __future__ import annotations

import json
import os
import queue
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial as bind
from pathlib import Path
from typing import Any, TypeVar

import psutil
import torch
from safetensors.torch import save_file

from .atomic import atomic_write_text, fsync_path
from .shards import StoredTensor, sha256_in_place, shard_name, write_copy

STATE_NAME = "statprune_state.json"
_T = TypeVar("_T")


def _available_host_memory() -> int | None:
    try:
        return int(psutil.virtual_memory().available)
    except (OSError, RuntimeError, AttributeError):  # pragma: no cover - an unsupported platform
        return None


def writer_threads_for(block_bytes: int) -> int:
    """2 writer threads when host memory has room for many more blocks than they hold, else 1."""
    available = _available_host_memory()
    return 2 if available is not None and available > 16 * block_bytes else 1


PINNED_WRITE_BYTES = 2 << 30
"""Pinned write buffers in all, in block bytes (at least one buffer).

Blocks reach them on a side stream, so a buffer is taken before its block's last kernels have run and is
held until the block is written. With the copies made that way, the 70B shape's host RSS went from 7.4 to
11.5 GiB (H200): most likely two more 1.7 GB blocks (2 GiB each once pinned) were held at once. This cap
keeps that shape at one write buffer, as before; a 7B block (0.4 GB) keeps the four the writer can use."""


def write_buffer_count(writer_threads: int, block_bytes: int, pin: bool) -> int:
    """Host buffers carrying blocks to the writer: one per writer thread, one queued, one being filled;
    pinned ones no more than ``PINNED_WRITE_BYTES`` hold (at least one)."""
    count = writer_threads + 2
    return min(count, max(1, PINNED_WRITE_BYTES // max(block_bytes, 1))) if pin else count


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
        self._prepared: queue.Queue = queue.Queue()  # buffers ``prepare`` allocated, for the first acquires
        self._unclaimed = 0

    def prepare(self, nbytes: int, count: int) -> None:
        """Allocate up to ``count`` buffers of ``nbytes`` now, on a background thread. Page-locking a buffer
        of a 7B block takes ~0.1 s of host time; left to ``acquire`` it falls on the main thread at the
        first blocks' stores, and the GPU waits for it. The first ``count`` acquires that would allocate
        wait for these instead, so no more buffers exist than without this."""
        if not self.reuse or count <= 0:
            return
        self._unclaimed += count

        def fill() -> None:
            for _ in range(count):
                buffer = None  # a failed allocation: acquire allocates then, as without this
                try:
                    buffer = torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=self.pin)
                finally:
                    self._prepared.put(buffer)

        threading.Thread(target=fill, name="statprune-host-buffers", daemon=True).start()

    def acquire(self, nbytes: int) -> torch.Tensor:
        """A buffer of at least ``nbytes``; waits while all are in use. Called from one thread."""
        buffer = self._free.get()
        if buffer is None and self._unclaimed:
            self._unclaimed -= 1
            buffer = self._prepared.get()
        if buffer is None or not self.reuse or buffer.numel() < nbytes:
            buffer = None  # the old one goes before the new one is allocated
            buffer = torch.empty(max(nbytes, 1), dtype=torch.uint8, pin_memory=self.pin)
        return buffer

    def release(self, buffer: torch.Tensor | None) -> None:
        self._free.put(buffer if self.reuse else None)


class ShardWriter:
    """Writes one shard per block from background threads, hashing every tensor it writes in parallel, and
    records each block in the state file once its shard is durable, so a crash loses at most the blocks in
    flight. At most ``threads + max_pending`` blocks wait in it (one more is being filled in the
    ``HostBufferPool`` that carries them).

    ``sync="background"``: writer threads only write (to the page cache) and rename; one more thread fsyncs
    whatever shards have been written since its last round, then the directory, then records those blocks.
    ``sync="inline"``: each writer thread fsyncs its own shard before recording it. Either way a block is in
    ``statprune_state.json`` only after its shard and the rename are on disk."""

    writes = True

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
        self.file_digests: dict[str, dict[str, str]] = {}  # shards that are not blocks: key -> sha256
        self._threads = [
            threading.Thread(target=self._run, name=f"statprune-writer-{i}", daemon=True) for i in range(threads)
        ]
        for t in self._threads:
            t.start()
        self._syncer = threading.Thread(target=self._sync_run, name="statprune-sync", daemon=True)
        self._syncer.start()

    def submit(self, index: int, tensors: dict[str, torch.Tensor], hashed: dict[str, tuple[str, int | None]],
               records: list[dict], release=None, extra: dict[str, Any] | None = None, ready=None) -> None:
        """Queue block ``index``'s shard; ``release()`` is called once ``tensors`` are no longer read.
        ``extra`` goes into the block's state entry (e.g. the digest of its source bytes, its seconds).
        ``ready`` (e.g. a CUDA event) is synchronized before ``tensors`` are read: copies still filling them."""
        self._raise()
        self._queue.put((index, tensors, hashed, records, release, extra or {}, ready))

    def submit_file(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        """Write (and make durable) a shard that is not a block."""
        self._raise()
        self._queue.put((name, tensors))

    def submit_copy(self, name: str, tensors: Sequence[StoredTensor], dtypes: Mapping[str, torch.dtype],
                    cast: Callable[[torch.Tensor, str], torch.Tensor]) -> None:
        """Write a shard that is not a block straight from the tensors' source files (``write_copy``), e.g.
        the tensors outside the blocks: host memory holds a chunk of them at a time, not all of them."""
        self._raise()
        self._queue.put((name, bind(write_copy, tensors=tensors, dtypes=dtypes, cast=cast)))

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
            release = item[4] if len(item) == 7 else None
            try:
                if len(item) == 7 and item[6] is not None:
                    item[6].synchronize()  # the block's bytes are all in host memory (also before a release)
                if self._error is not None:
                    pass  # after a failure, queued blocks are dropped (the error surfaces on close)
                elif len(item) == 2:
                    self._write_file(*item)
                else:
                    self._write(*item[:4], item[5])
            except BaseException as e:  # surfaced on the next submit/close
                self._error = e
            item = None  # the block's host memory goes now, not at the next get()
            if release is not None:
                release()

    def _save(self, name: str, write: Callable[[Path], _T]) -> _T:
        """``write(path)`` a temporary file, then rename it to shard ``name``."""
        tmp = self.partial / f".{name}.tmp"
        result = write(tmp)
        if self.sync == "inline":
            fsync_path(tmp)
        os.replace(tmp, self.partial / name)
        return result

    def _hash_all(self, tensors: dict[str, torch.Tensor]) -> dict[str, Future]:
        return {k: self._hashers.submit(sha256_in_place, v) for k, v in tensors.items()}

    def _write_file(self, name: str, tensors: dict[str, torch.Tensor] | Callable[[Path], dict[str, str]]) -> None:
        """A shard that is not a block: ``tensors``, or a copy that writes the file and returns its digests."""
        if callable(tensors):
            self.file_digests[name] = self._save(name, tensors)
        else:
            digests = self._hash_all(tensors)
            self._save(name, bind(save_file, tensors, metadata={"format": "pt"}))
            self.file_digests[name] = {k: f.result() for k, f in digests.items()}
        if self.sync == "inline":
            fsync_path(self.partial, directory=True)
        else:
            self._written.put((None, name, None))

    def _write(self, index: int, tensors: dict[str, torch.Tensor], hashed: dict[str, tuple[str, int | None]],
               records: list[dict], extra: dict[str, Any]) -> None:
        name = shard_name(index, self.total)
        model_format = tensors
        if self.to_checkpoint is not None:  # pruned layers hashed as the model holds them, written as the checkpoint had them
            tensors = self.to_checkpoint(tensors)
        saved = self._hash_all(tensors)  # every tensor as stored, for the manifest and for resume
        digests = {}
        for rec in records:
            key, expert = hashed[rec["name"]]
            rec["tensor"] = key
            if expert is None and self.to_checkpoint is None:
                digests[rec["name"]] = saved[key]
            else:
                t = model_format[key] if expert is None else model_format[key][expert]
                digests[rec["name"]] = self._hashers.submit(sha256_in_place, t)
        self._save(name, bind(save_file, tensors, metadata={"format": "pt"}))
        for rec in records:
            rec["sha256"] = digests[rec["name"]].result()
        entry = {"shard": name, "keys": sorted(tensors), "layers": records,
                 "tensors": {k: f.result() for k, f in sorted(saved.items())}, **extra}
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


class ReadOnlyWriter:
    """The writer of a rank other than 0 when several processes prune: it holds the resume state rank 0
    read (so finished blocks are read back from their output shards) and writes nothing; rank 0's
    ``ShardWriter`` writes every shard."""

    writes = False

    def __init__(self, state: dict[str, Any]):
        self.state = state
        self.file_digests: dict[str, dict[str, str]] = {}

    def submit(self, index: int, tensors: dict[str, torch.Tensor], hashed: dict[str, tuple[str, int | None]],
               records: list[dict], release=None, extra: dict[str, Any] | None = None, ready=None) -> None:
        if release is not None:
            if ready is not None:
                ready.synchronize()
            release()

    def submit_file(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        pass

    def submit_copy(self, name: str, tensors: Sequence[StoredTensor], dtypes: Mapping[str, torch.dtype],
                    cast: Callable[[torch.Tensor, str], torch.Tensor]) -> None:
        pass

    def close(self) -> None:
        pass

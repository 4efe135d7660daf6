"""Reading safetensors checkpoints: the index, shard headers, tensors straight to host memory or a device,
the hash of a tensor's stored bytes, and copying stored tensors into a new file a chunk at a time.
Streaming and verification both read through here."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from huggingface_hub.constants import SAFETENSORS_INDEX_FILE as INDEX_NAME
from huggingface_hub.constants import SAFETENSORS_SINGLE_FILE as SINGLE_NAME
from safetensors import safe_open

ALIGNMENT = 64  # byte alignment of each tensor inside a (pinned) host buffer


def aligned_nbytes(nbytes: int) -> int:
    return -(-nbytes // ALIGNMENT) * ALIGNMENT


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's raw bytes as safetensors stores them (row-major, native little-endian)."""
    t = tensor.detach().contiguous().cpu()
    return hashlib.sha256(t.reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("U16", "uint16"),
                     ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        SAFETENSORS_DTYPES[_name] = getattr(torch, _attr)
_SAFETENSORS_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}


# bits per element of every dtype safetensors defines (sub-byte ones are packed)
SAFETENSORS_BITS = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64,
    "F64": 64, "C64": 64,
}
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on the JSON header


class CheckpointError(ValueError):
    """A checkpoint file or index that is not what it claims to be (names the file and, where known, the tensor)."""


class CheckpointReader:
    """Tensors of a (sharded) safetensors checkpoint, by name, read straight to a device."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        index = self.directory / INDEX_NAME
        if index.is_file():
            self.weight_map: dict[str, str] = _read_weight_map(index)
        else:
            single = self.directory / SINGLE_NAME
            if not single.is_file():
                raise FileNotFoundError(f"{self.directory} holds no safetensors checkpoint ({INDEX_NAME} or {SINGLE_NAME})")
            with safe_open(single, framework="pt") as f:
                self.weight_map = dict.fromkeys(f.keys(), single.name)

    def tensor_names(self) -> list[str]:
        return list(self.weight_map)

    def read(self, keys: Sequence[str], device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Read ``keys``, opening each shard once; handles are closed again so no mapping lingers."""
        by_file: dict[str, list[str]] = {}
        for k in keys:
            by_file.setdefault(self.weight_map[k], []).append(k)
        out = {}
        for file, names in by_file.items():
            with safe_open(self.directory / file, framework="pt", device=str(device)) as f:
                for k in names:
                    out[k] = f.get_tensor(k)
        return out

    def files(self, keys: Sequence[str]) -> dict[Path, list[str]]:
        """``keys`` grouped by the shard that holds them."""
        by_file: dict[Path, list[str]] = {}
        for k in keys:
            by_file.setdefault(self.directory / self.weight_map[k], []).append(k)
        return by_file

    def stored_dtype(self) -> torch.dtype | None:
        """The first floating dtype stored, in weight-map order, from the headers alone: what
        ``from_pretrained(dtype="auto")`` loads a checkpoint whose config names no dtype in."""
        for file in dict.fromkeys(self.weight_map.values()):
            _, header = safetensors_header(self.directory / file)
            for entry in header.values():
                dtype = SAFETENSORS_DTYPES.get(entry["dtype"])
                if dtype is not None and dtype.is_floating_point:
                    return dtype
        return None

    def fingerprint(self) -> str:
        """Identifies the checkpoint by content, not by timestamps: the weight map and, per shard, its name,
        size and the sha256 of its header (every tensor's name, dtype, shape and offsets). Reads only the
        headers. Any re-save that moves, resizes, renames or re-types a tensor changes it; a checkpoint of
        the same shapes with different values does not (``source_digest`` of a block catches that)."""
        h = hashlib.sha256(json.dumps(self.weight_map, sort_keys=True).encode())
        for file in sorted(set(self.weight_map.values())):
            path = self.directory / file
            raw = _header_bytes(path)
            h.update(f"{file}:{path.stat().st_size}:{hashlib.sha256(raw).hexdigest()}".encode())
        return h.hexdigest()


def _read_weight_map(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: not a safetensors index (a JSON object with a weight_map): {e}") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index}: weight_map must map tensor names to shard file names")
    for file in set(weight_map.values()):
        if Path(file).name != file:
            raise CheckpointError(f"{index}: shard {file!r} is not a file name inside the checkpoint directory")
    return weight_map


def _header_bytes(path: Path) -> bytes:
    """The JSON header of a safetensors file, its length checked against the file's size."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path}: {size} bytes, too short for a safetensors file (8-byte header length)")
        n = int.from_bytes(prefix, "little")
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise CheckpointError(f"{path}: header length {n} does not fit a {size}-byte file; the file is truncated or not safetensors")
        raw = f.read(n)
    if len(raw) != n:
        raise CheckpointError(f"{path}: ends inside its header")
    return raw


def safetensors_header(path: Path) -> tuple[int, dict[str, Any]]:
    """Byte offset where the data starts, and the tensor entries (dtype, shape, data_offsets), validated as
    safetensors does: a JSON object, known dtypes, offsets contiguous from 0 and in bounds, each tensor's
    byte length matching its shape and dtype, the data ending exactly at the end of the file."""
    path = Path(path)
    raw = _header_bytes(path)
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: the header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the header is not a JSON object")
    metadata = header.pop("__metadata__", None)
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise CheckpointError(f"{path}: __metadata__ must map strings to strings")
    spans = []
    for name, entry in header.items():
        spans.append((*_check_entry(path, name, entry), name))
    spans.sort()
    expected = 0
    for begin, end, name in spans:
        if begin != expected:
            what = "overlaps the tensor before it" if begin < expected else f"leaves a gap at byte {expected}"
            raise CheckpointError(f"{path}: tensor {name!r} starts at data byte {begin} and {what}")
        expected = end
    data_bytes = path.stat().st_size - 8 - len(raw)
    if expected != data_bytes:
        raise CheckpointError(f"{path}: the tensors end at data byte {expected} but the file holds {data_bytes} data bytes")
    return 8 + len(raw), header


def _check_entry(path: Path, name: str, entry: Any) -> tuple[int, int]:
    if not isinstance(entry, dict):
        raise CheckpointError(f"{path}: tensor {name!r} has no dtype/shape/data_offsets entry")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in SAFETENSORS_BITS:
        raise CheckpointError(f"{path}: tensor {name!r} has unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise CheckpointError(f"{path}: tensor {name!r} has an invalid shape {shape!r}")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)
            or offsets[0] > offsets[1]):
        raise CheckpointError(f"{path}: tensor {name!r} has invalid data_offsets {offsets!r}")
    numel = 1
    for d in shape:
        numel *= d
    bits = numel * SAFETENSORS_BITS[dtype]
    if bits % 8 or offsets[1] - offsets[0] != bits // 8:
        raise CheckpointError(
            f"{path}: tensor {name!r} spans {offsets[1] - offsets[0]} bytes but {dtype} {shape} needs {bits / 8:g}"
        )
    return offsets[0], offsets[1]


def read_exact(f, offset: int, out: torch.Tensor) -> None:
    """Fill the 1-d uint8 CPU tensor ``out`` from ``offset`` of the unbuffered file ``f`` (no mmap; the
    read releases the GIL)."""
    view = memoryview(out.numpy()).cast("B")
    f.seek(offset)
    pos = 0
    while pos < len(view):
        n = f.readinto(view[pos:])
        if not n:
            raise EOFError(f"{f.name} ends before byte {offset + len(view)}")
        pos += n


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor's bytes lie in a safetensors file (``offset``: from the start of the file)."""

    name: str
    path: Path
    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def locate(files: dict[Path, list[str] | None]) -> list[StoredTensor]:
    """The tensors of ``files`` (``None``: all of a file's), from the headers alone; ``KeyError`` for a
    dtype torch has no tensor type for."""
    out = []
    for path, names in files.items():
        start, header = safetensors_header(path)
        for name in header if names is None else names:
            if name not in header:
                raise CheckpointError(f"{path}: has no tensor {name!r}, which the index places there")
            entry = header[name]
            begin, end = entry["data_offsets"]
            out.append(StoredTensor(name, Path(path), start + begin, end - begin, SAFETENSORS_DTYPES[entry["dtype"]],
                                    tuple(entry["shape"])))
    return out


COPY_CHUNK_BYTES = 64 * 2**20
"""What one step of a chunked read or copy holds in host memory."""


def read_tensors(stored: Sequence[StoredTensor], device: torch.device | str = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """The stored tensors on ``device`` one at a time, bytes unchanged. On a GPU they go through two pinned
    chunks in turn (one is read while the other is copied), so host memory holds two chunks, not a tensor."""
    device = torch.device(device)
    staging: list[torch.Tensor] = []
    copied: list[torch.cuda.Event | None] = [None, None]
    for t in stored:
        out = torch.empty(t.nbytes, dtype=torch.uint8, device=device)
        with open(t.path, "rb", buffering=0) as f:
            if device.type == "cpu":
                read_exact(f, t.offset, out)
                yield t.name, out.view(t.dtype).view(t.shape)
                continue
            if not staging and t.nbytes:
                staging = [torch.empty(COPY_CHUNK_BYTES, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
            for j, pos in enumerate(range(0, t.nbytes, COPY_CHUNK_BYTES)):
                n, slot = min(COPY_CHUNK_BYTES, t.nbytes - pos), j % 2
                if copied[slot] is not None:
                    copied[slot].synchronize()  # its last chunk is on the device
                read_exact(f, t.offset + pos, staging[slot][:n])
                out[pos : pos + n].copy_(staging[slot][:n], non_blocking=True)
                copied[slot] = torch.cuda.Event()
                copied[slot].record(torch.cuda.current_stream(device))
        yield t.name, out.view(t.dtype).view(t.shape)
    if staging:
        torch.cuda.current_stream(device).synchronize()  # the copies are done before the staging goes


def write_copy(destination: Path, tensors: Sequence[StoredTensor], dtypes: Mapping[str, torch.dtype] | None = None,
               cast: Callable[[torch.Tensor, str], torch.Tensor] = lambda t, _: t) -> dict[str, str]:
    """Write ``tensors`` read from their files into one safetensors file at ``destination``, a floating one
    converted to ``dtypes[name]`` (where given) by ``cast(chunk, name)`` (which may refuse an overflowing
    cast), a chunk at a time: host memory holds one chunk, not the tensors (an embedding and ``lm_head``
    of a large vocabulary are gigabytes). Returns each tensor's sha256 as written (``tensor_sha256``)."""
    dtypes = dtypes or {}
    plan, begin = [], 0
    for t in sorted(tensors, key=lambda t: t.name):
        out_dtype = dtypes.get(t.name, t.dtype) if t.dtype.is_floating_point else t.dtype
        nbytes = t.nbytes // t.dtype.itemsize * out_dtype.itemsize
        plan.append((t, out_dtype, begin, begin + nbytes))
        begin += nbytes
    header = {"__metadata__": {"format": "pt"}}
    header.update({t.name: {"dtype": _SAFETENSORS_NAMES[d], "shape": list(t.shape), "data_offsets": [b, e]}
                   for t, d, b, e in plan})
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    digests = {}
    with open(destination, "wb") as out:
        out.write(struct.pack("<Q", len(raw)) + raw)
        for t, out_dtype, _, _ in plan:
            h = hashlib.sha256()
            with open(t.path, "rb", buffering=0) as f:
                chunk = torch.empty(min(COPY_CHUNK_BYTES, t.nbytes), dtype=torch.uint8)
                for pos in range(0, t.nbytes, COPY_CHUNK_BYTES):
                    piece = chunk[: min(COPY_CHUNK_BYTES, t.nbytes - pos)]
                    read_exact(f, t.offset + pos, piece)
                    if out_dtype != t.dtype:
                        piece = cast(piece.view(t.dtype), t.name).to(out_dtype).view(torch.uint8)
                    data = memoryview(piece.numpy())
                    h.update(data)
                    out.write(data)
            digests[t.name] = h.hexdigest()
    return digests


def read_to_host(files: dict[Path, list[str] | None], staging: torch.Tensor | None = None,
                 pin: bool = False) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """Read tensors (``None``: all of a file's) with plain reads into host memory, bytes unchanged.

    The tensors are views into one buffer (one large allocation, which the C allocator maps and unmaps as a
    whole: many mid-size ones made on this thread and freed on another fragment its heap). With ``pin`` the
    buffer is pinned and reused as ``staging`` while large enough, so the tensors must be copied to the
    device before the next read. Returns the tensors and the buffer."""
    plan = locate(files)
    total, offset = 0, []
    for t in plan:
        offset.append(total)
        total += aligned_nbytes(t.nbytes)
    if not pin:
        staging = torch.empty(max(total, 1), dtype=torch.uint8)
    elif staging is None or staging.numel() < total:
        staging = torch.empty(max(total, 1), dtype=torch.uint8, pin_memory=True)
    slots = [staging[o : o + t.nbytes] for o, t in zip(offset, plan, strict=True)]
    by_file: dict[Path, list[int]] = {}
    for j, t in enumerate(plan):
        by_file.setdefault(t.path, []).append(j)
    for path, js in by_file.items():
        with open(path, "rb", buffering=0) as f:
            for j in sorted(js, key=lambda j: plan[j].offset):  # in file order
                read_exact(f, plan[j].offset, slots[j])
    return {t.name: slot.view(t.dtype).view(t.shape) for t, slot in zip(plan, slots, strict=True)}, staging


def sha256_in_place(tensor: torch.Tensor) -> str:
    """``tensor_sha256`` of a contiguous CPU tensor, hashed in place (no copy of its bytes; hashlib
    releases the GIL)."""
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        return tensor_sha256(tensor)
    return hashlib.sha256(memoryview(tensor.reshape(-1).view(torch.uint8).numpy())).hexdigest()


def shard_name(index: int, total: int) -> str:
    return f"model-{index + 1:05d}-of-{total:05d}.safetensors"



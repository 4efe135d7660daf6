"""Reading safetensors checkpoints: the index, shard headers, tensors straight to host memory or a device,
and the hash of a tensor's stored bytes. Streaming and verification both read through here."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
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


class CheckpointReader:
    """Tensors of a (sharded) safetensors checkpoint, by name, read straight to a device."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        index = self.directory / INDEX_NAME
        if index.is_file():
            self.weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
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

    def fingerprint(self) -> str:
        """Identifies the checkpoint: names, sizes and mtimes of its shards."""
        h = hashlib.sha256()
        for file in sorted(set(self.weight_map.values())):
            st = (self.directory / file).stat()
            h.update(f"{file}:{st.st_size}:{int(st.st_mtime)}".encode())
        return h.hexdigest()


def safetensors_header(path: Path) -> tuple[int, dict[str, Any]]:
    """Byte offset where the data starts, and the tensor entries (dtype, shape, data_offsets)."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return 8 + n, header


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


def read_to_host(files: dict[Path, list[str] | None], staging: torch.Tensor | None = None,
                 pin: bool = False) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """Read tensors (``None``: all of a file's) with plain reads into host memory, bytes unchanged.

    The tensors are views into one buffer (one large allocation, which the C allocator maps and unmaps as a
    whole: many mid-size ones made on this thread and freed on another fragment its heap). With ``pin`` the
    buffer is pinned and reused as ``staging`` while large enough, so the tensors must be copied to the
    device before the next read. Returns the tensors and the buffer."""
    plan = []
    for path, names in files.items():
        start, header = safetensors_header(path)
        for name in header if names is None else names:
            entry = header[name]
            begin, end = entry["data_offsets"]
            plan.append((path, start + begin, end - begin, SAFETENSORS_DTYPES[entry["dtype"]], entry["shape"], name))
    out: dict[str, torch.Tensor] = {}
    total, offset = 0, []
    for item in plan:
        offset.append(total)
        total += aligned_nbytes(item[2])
    if not pin:
        staging = torch.empty(max(total, 1), dtype=torch.uint8)
    elif staging is None or staging.numel() < total:
        staging = torch.empty(max(total, 1), dtype=torch.uint8, pin_memory=True)
    slots = [staging[o : o + item[2]] for o, item in zip(offset, plan, strict=True)]
    by_file: dict[Path, list[int]] = {}
    for j, item in enumerate(plan):
        by_file.setdefault(item[0], []).append(j)
    for path, js in by_file.items():
        with open(path, "rb", buffering=0) as f:
            for j in sorted(js, key=lambda j: plan[j][1]):  # in file order
                read_exact(f, plan[j][1], slots[j])
    for (_, _, _, dtype, shape, name), slot in zip(plan, slots, strict=True):
        out[name] = slot.view(dtype).view(shape)
    return out, staging


def sha256_in_place(tensor: torch.Tensor) -> str:
    """``tensor_sha256`` of a contiguous CPU tensor, hashed in place (no copy of its bytes; hashlib
    releases the GIL)."""
    if tensor.device.type != "cpu" or not tensor.is_contiguous():
        return tensor_sha256(tensor)
    return hashlib.sha256(memoryview(tensor.reshape(-1).view(torch.uint8).numpy())).hexdigest()


def shard_name(index: int, total: int) -> str:
    return f"model-{index + 1:05d}-of-{total:05d}.safetensors"



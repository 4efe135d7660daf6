"""Test helpers: a schema-2 manifest computed here, independently of any writer, and byte-level damage."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from optimum_statprune.checkpoint.shards import (
    INDEX_NAME,
    SINGLE_NAME,
    CheckpointReader,
    safetensors_header,
    tensor_sha256,
)
from optimum_statprune.sharing.manifest import MANIFEST_NAME


def as_schema_2(folder: Path) -> dict[str, Any]:
    """Rewrite the folder's manifest as schema 2: "tensors" (``tensor_sha256`` of every stored tensor)
    and "files" (the size of every shard the index names, or of model.safetensors)."""
    index = folder / INDEX_NAME
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else [SINGLE_NAME]
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    manifest["schema_version"] = 2
    manifest["files"] = {name: (folder / name).stat().st_size for name in files}
    manifest["tensors"] = {k: tensor_sha256(t) for name in files for k, t in load_file(folder / name).items()}
    (folder / MANIFEST_NAME).write_text(json.dumps(manifest))
    return manifest


def flip_byte(folder: Path, key: str, at: int = 0) -> None:
    """Flip the lowest bit of byte ``at`` of tensor ``key`` in its shard, in place (same file size)."""
    path = folder / CheckpointReader(folder).weight_map[key]
    start, header = safetensors_header(path)
    offset = start + header[key]["data_offsets"][0] + at
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))

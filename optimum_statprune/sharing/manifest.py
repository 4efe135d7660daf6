"""The pruning manifest: what was pruned, how, with which calibration, and hashes of what was saved."""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import json
import os
from pathlib import Path
from typing import Any

import torch

from ..checkpoint.atomic import atomic_write_text

MANIFEST_NAME = "pruning_manifest.json"
MANIFEST_SCHEMA_VERSION = 2
# 1: hashes of the pruned linears only; 2: adds "tensors" (sha256 of every saved tensor's stored bytes, by
# its key in the safetensors files) and "files" (the size in bytes of every shard the index names)
READABLE_SCHEMA_VERSIONS = (1, 2)
_DEPENDENCIES = ("torch", "transformers", "optimum", "accelerate", "safetensors", "datasets", "huggingface_hub")


def calibration_fingerprint(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, seqlen: int, seed: int) -> dict[str, Any]:
    """Identifies the calibration tokens: sha256 of the int64 ids (and mask), sample and token counts."""
    h = hashlib.sha256(input_ids.detach().to(torch.int64).contiguous().cpu().numpy().tobytes())
    tokens = int(input_ids.numel())
    if attention_mask is not None:
        h.update(attention_mask.detach().to(torch.int8).contiguous().cpu().numpy().tobytes())
        tokens = int(attention_mask.sum())
    return {
        "sha256": h.hexdigest(),
        "nsamples": int(input_ids.shape[0]),
        "seqlen": int(seqlen),
        "tokens": tokens,
        "seed": int(seed),
    }


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in ("optimum-statprune", *_DEPENDENCIES):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = None
    return out


def build_manifest(
    config: dict[str, Any],
    layers: list[dict[str, Any]],
    calibration: dict[str, Any] | None,
    model_info: dict[str, Any],
    seconds: float | None = None,
    owl: dict[str, Any] | None = None,
    tensors: dict[str, str] | None = None,
    files: dict[str, int] | None = None,
    world_size: int = 1,
) -> dict[str, Any]:
    """The manifest; ``tensors`` and ``files`` describe the saved shards (see ``saved_shards``);
    ``world_size``: the processes that pruned (their sums are added in another order)."""
    total = sum(_numel(rec["shape"]) for rec in layers)
    pruned = sum(rec["sparsity"] * _numel(rec["shape"]) for rec in layers)
    model_info = dict(model_info)
    if "name_or_path" in model_info:
        model_info["name_or_path"] = public_source(model_info["name_or_path"])
    return {
        "schema_version": MANIFEST_SCHEMA_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "model": model_info,
        "config": config,
        "calibration": calibration,
        "pruning_seconds": seconds,
        "world_size": world_size,
        "summary": {"layers": len(layers), "weights": total, "sparsity": pruned / total if total else 0.0},
        "owl": owl,
        "layers": layers,
        "tensors": dict(sorted((tensors or {}).items())),
        "files": dict(sorted((files or {}).items())),
    }


def public_source(name: Any) -> str | None:
    """What a manifest may say about where something came from: a Hub id as is, a local path only as its
    last component (manifests are pushed to the Hub; absolute paths name users and machines)."""
    if name is None:
        return None
    text = str(name)
    if os.path.isabs(text) or text.startswith(("~", ".")) or os.path.exists(text) or "\\" in text:
        return os.path.basename(os.path.normpath(os.path.expanduser(text))) or text
    return text


def saved_shards(directory: str | os.PathLike) -> tuple[dict[str, str], dict[str, int]]:
    """``tensors`` and ``files`` of the manifest, read back from the safetensors files in ``directory``:
    the sha256 of every tensor's stored bytes and the size of every shard, one shard in memory at a time."""
    from concurrent.futures import ThreadPoolExecutor

    from ..checkpoint.resume import tensor_digests
    from ..checkpoint.shards import CheckpointReader, read_to_host

    reader = CheckpointReader(directory)
    tensors: dict[str, str] = {}
    files: dict[str, int] = {}
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="statprune-hash") as pool:
        for file in sorted(set(reader.weight_map.values())):
            path = Path(directory) / file
            files[file] = path.stat().st_size
            read, _ = read_to_host({path: None})
            tensors.update(tensor_digests(read, pool))  # hashlib releases the GIL: one thread per tensor
            del read
    return dict(sorted(tensors.items())), files


def pruning_config_block(config: dict[str, Any], base_model: str | None) -> dict[str, Any]:
    """The small record kept in ``config.json`` as ``pruning_config``: enough to tell a pruned checkpoint
    at a glance, without being a ``quantization_config`` (which would stop Trainer from full fine-tuning)."""
    return {
        "library": "optimum-statprune",
        "version": versions()["optimum-statprune"],
        "method": config["method"],
        "sparsity": config["sparsity"] if config["pattern"] == "unstructured" else None,
        "pattern": config["pattern"],
        "base_model": base_model,
        "manifest": MANIFEST_NAME,
    }


def write_manifest(directory: str | os.PathLike, manifest: dict[str, Any], published: bool = True) -> str:
    """Write the manifest atomically; sources are recorded as ``public_source`` names. In a ``published``
    model directory the temp file goes beside it (``.<dir>.tmp-XXXX``, removed by the next run of that
    output if a kill leaves it), never inside; a directory still being built holds its own temp files."""
    path = os.path.join(directory, MANIFEST_NAME)
    manifest = _sanitized(manifest)
    atomic_write_text(path, json.dumps(manifest, indent=2) + "\n", temp_beside=published)
    return path


def _sanitized(manifest: dict[str, Any]) -> dict[str, Any]:
    out = dict(manifest)
    if isinstance(out.get("model"), dict) and "name_or_path" in out["model"]:
        out["model"] = {**out["model"], "name_or_path": public_source(out["model"]["name_or_path"])}
    for section in ("calibration",):
        if isinstance(out.get(section), dict) and "source" in out[section]:
            out[section] = {**out[section], "source": public_source(out[section]["source"])}
    evaluation = out.get("evaluation")
    if isinstance(evaluation, dict):
        out["evaluation"] = {
            k: ({**v, "source": public_source(v["source"])} if isinstance(v, dict) and "source" in v else v)
            for k, v in evaluation.items()
        }
    return out


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    path = os.path.join(directory, MANIFEST_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {MANIFEST_NAME} in {directory}: not a model pruned by optimum-statprune")
    with open(path, encoding="utf-8") as f:
        manifest = json.load(f)
    if manifest.get("schema_version") not in READABLE_SCHEMA_VERSIONS:
        raise ValueError(
            f"{path} has manifest schema {manifest.get('schema_version')!r}; this version reads "
            f"{', '.join(map(str, READABLE_SCHEMA_VERSIONS))}"
        )
    return manifest


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n

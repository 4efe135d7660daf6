"""The pruning manifest: what was pruned, how, with which calibration, and hashes of what was saved."""

from __future__ import annotations

import datetime
import hashlib
import importlib.metadata
import json
import os
from typing import Any

import torch

from ..checkpoint.atomic import atomic_write_text

MANIFEST_NAME = "pruning_manifest.json"
MANIFEST_SCHEMA_VERSION = 1
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
) -> dict[str, Any]:
    total = sum(_numel(rec["shape"]) for rec in layers)
    pruned = sum(rec["sparsity"] * _numel(rec["shape"]) for rec in layers)
    return {
        "schema_version": MANIFEST_SCHEMA_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
        "model": model_info,
        "config": config,
        "calibration": calibration,
        "pruning_seconds": seconds,
        "summary": {"layers": len(layers), "weights": total, "sparsity": pruned / total if total else 0.0},
        "owl": owl,
        "layers": layers,
    }


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


def write_manifest(directory: str | os.PathLike, manifest: dict[str, Any]) -> str:
    path = os.path.join(directory, MANIFEST_NAME)
    atomic_write_text(path, json.dumps(manifest, indent=2) + "\n")
    return path


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    path = os.path.join(directory, MANIFEST_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {MANIFEST_NAME} in {directory}: not a model pruned by optimum-statprune")
    with open(path, encoding="utf-8") as f:
        manifest = json.load(f)
    if manifest.get("schema_version") != MANIFEST_SCHEMA_VERSION:
        raise ValueError(
            f"{path} has manifest schema {manifest.get('schema_version')!r}; this version reads {MANIFEST_SCHEMA_VERSION}"
        )
    return manifest


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n

"""Prune straight from checkpoint shards to output shards, never holding the whole model in host memory.

The model skeleton is built on the meta device; embeddings and other tensors outside the blocks are
loaded once for the capture; each block is read from the input safetensors to the compute device,
pruned, written to its own output shard by a background thread (which also hashes it), then dropped
back to meta. Progress lives in ``.<name>.partial/`` beside the output directory, which is renamed into
place only when complete; running the same command again resumes from the last finished block.
"""

from __future__ import annotations

import hashlib
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

from .config import StatPruneConfig
from .engine import (
    BlockInputs,
    CalibrationBatch,
    PruneReport,
    _hidden_size,
    capture_block_inputs,
    choose_placement,
    prune_blocks,
)
from .io import atomic_write_text
from .manifest import build_manifest, pruning_config_block, tensor_sha256, write_manifest
from .models import find_blocks, find_targets

logger = logging.getLogger(__name__)

STATE_NAME = "statprune_state.json"
INDEX_NAME = "model.safetensors.index.json"


class ResumeMismatchError(ValueError):
    """An unfinished run with different settings occupies the output's partial directory."""


class CheckpointReader:
    """Tensors of a (sharded) safetensors checkpoint, by name, read straight to a device."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        index = self.directory / INDEX_NAME
        if index.is_file():
            self.weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        else:
            single = self.directory / "model.safetensors"
            if not single.is_file():
                raise FileNotFoundError(f"{self.directory} holds no safetensors checkpoint ({INDEX_NAME} or model.safetensors)")
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

    def fingerprint(self) -> str:
        """Identifies the checkpoint: names, sizes and mtimes of its shards."""
        h = hashlib.sha256()
        for file in sorted(set(self.weight_map.values())):
            st = (self.directory / file).stat()
            h.update(f"{file}:{st.st_size}:{int(st.st_mtime)}".encode())
        return h.hexdigest()


def shard_name(index: int, total: int) -> str:
    return f"model-{index + 1:05d}-of-{total:05d}.safetensors"


class ShardWriter:
    """Writes one shard per block from background threads, hashing the targeted tensors in parallel, and
    records each block in the state file once its shard is durable, so a crash loses at most the blocks in
    flight. At most ``threads + max_pending`` blocks wait in host memory."""

    def __init__(self, partial: Path, total_shards: int, state: dict[str, Any], threads: int = 1, max_pending: int = 1):
        self.partial = partial
        self.total = total_shards
        self.state = state
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._lock = threading.Lock()
        self._hashers = ThreadPoolExecutor(max_workers=8, thread_name_prefix="statprune-hash")
        self._error: BaseException | None = None
        self._threads = [
            threading.Thread(target=self._run, name=f"statprune-writer-{i}", daemon=True) for i in range(threads)
        ]
        for t in self._threads:
            t.start()

    def submit(self, index: int, tensors: dict[str, torch.Tensor], hashed: dict[str, tuple[str, int | None]], records: list[dict]) -> None:
        self._raise()
        self._queue.put((index, tensors, hashed, records))

    def close(self) -> None:
        for _ in self._threads:
            self._queue.put(None)
        for t in self._threads:
            t.join()
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
            if self._error is not None:
                continue
            try:
                self._write(*item)
            except BaseException as e:  # surfaced on the next submit/close
                self._error = e

    def _write(self, index: int, tensors: dict[str, torch.Tensor], hashed: dict[str, tuple[str, int | None]], records: list[dict]) -> None:
        name = shard_name(index, self.total)
        digests = {}
        for rec in records:
            key, expert = hashed[rec["name"]]
            t = tensors[key] if expert is None else tensors[key][expert]
            rec["tensor"] = key
            digests[rec["name"]] = self._hashers.submit(tensor_sha256, t)
        tmp = self.partial / f".{name}.tmp"
        save_file(tensors, tmp, metadata={"format": "pt"})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, self.partial / name)
        for rec in records:
            rec["sha256"] = digests[rec["name"]].result()
        with self._lock:
            self.state["blocks"][str(index)] = {"shard": name, "keys": sorted(tensors), "layers": records}
            atomic_write_text(self.partial / STATE_NAME, json.dumps(self.state, indent=1) + "\n")


class StreamingBlockStore:
    """Blocks of a meta-device skeleton, filled from the input checkpoint (or, for blocks a previous run
    already finished, from their output shard) and handed to the writer after pruning."""

    def __init__(self, blocks: nn.ModuleList, blocks_path: str, reader: CheckpointReader, partial: Path,
                 dtype: torch.dtype | None, writer: ShardWriter, config: StatPruneConfig, done: set[int]):
        self.blocks = blocks
        self.blocks_path = blocks_path
        self.reader = reader
        self.partial = partial
        self.dtype = dtype
        self.writer = writer
        self.config = config
        self.done = done
        self.pending_records: dict[int, list[dict]] = {}

    def block_keys(self, index: int) -> list[str]:
        prefix = f"{self.blocks_path}.{index}."
        return [k for k in self.reader.tensor_names() if k.startswith(prefix)]

    def load(self, index: int, device: torch.device, original: bool = False) -> nn.Module:
        block = self.blocks[index]
        prefix = f"{self.blocks_path}.{index}."
        if index in self.done and not original:
            shard = self.partial / self.writer.state["blocks"][str(index)]["shard"]
            with safe_open(shard, framework="pt", device=str(device)) as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (not a dict)
        else:
            tensors = self.reader.read(self.block_keys(index), device)
        expected = {prefix + k for k, _ in _persistent_tensors(block)}
        if set(tensors) != expected:
            missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
            raise ValueError(
                f"block {index}'s checkpoint tensors do not match the model (missing {missing[:3]}, unexpected "
                f"{extra[:3]}): this checkpoint needs transformers' weight conversion; prune it in memory "
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
            tensors = {prefix + k: v.detach().to("cpu", copy=True).contiguous() for k, v in _persistent_tensors(block)}
            targets = find_targets(block, prefix[:-1], self.config.targets, self.config.ignore)
            hashed = {t.name: (t.state_key, t.expert) for t in targets}
            self.writer.submit(index, tensors, hashed, self.pending_records.pop(index, []))
        block.to("meta")

    def release(self, index: int, block: nn.Module) -> None:
        block.to("meta")


def _persistent_tensors(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Parameters and persistent buffers by state-dict name."""
    return list(module.state_dict(keep_vars=True).items())


def _load_outside(model: nn.Module, blocks_path: str, reader: CheckpointReader, device: torch.device, dtype) -> list[str]:
    """Load every checkpoint tensor outside the blocks into the skeleton; return their names."""
    keys = [k for k in reader.tensor_names() if not k.startswith(blocks_path + ".")]
    for key, value in reader.read(keys, "cpu").items():
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        set_module_tensor_to_device(model, key, device, value=value)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    still_meta = [n for n, p in model.named_parameters() if p.device.type == "meta" and not n.startswith(blocks_path + ".")]
    if still_meta:
        raise ValueError(f"the checkpoint lacks tensors the model needs outside its blocks: {still_meta[:5]}")
    return keys


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
) -> PruneReport:
    """Prune the safetensors checkpoint in ``source`` into ``output_dir``, one block at a time."""
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

    outside = _load_outside(model, blocks_path, reader, device, dtype)
    if config.needs_activations:
        dt = dtype or model.get_input_embeddings().weight.dtype
        on_host = choose_placement(activations, batches, _hidden_size(model), dt, device)
        inputs = capture_block_inputs(model, blocks_path, block_list, batches, device, on_host)
    else:
        inputs = BlockInputs([], False, [], [], [])
    writer = ShardWriter(partial, total, state)
    store = StreamingBlockStore(block_list, blocks_path, reader, partial, dtype, writer, config, done)
    try:
        report = prune_blocks(store, n_blocks, blocks_path, inputs, config, device, progress, skip=done,
                              on_block_pruned=lambda i, recs: store.pending_records.__setitem__(i, recs))
    finally:
        writer.close()
    report.layers = [rec for i in range(n_blocks) for rec in state["blocks"][str(i)]["layers"]]

    # everything outside the blocks, copied through unchanged (tied weights stay as the checkpoint had them)
    outside_tensors = {k: v.contiguous() for k, v in reader.read(outside, "cpu").items()}
    if dtype is not None:
        outside_tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in outside_tensors.items()}
    save_file(outside_tensors, partial / shard_name(n_blocks, total), metadata={"format": "pt"})
    weight_map = {k: shard_name(n_blocks, total) for k in outside_tensors}
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
    if output.exists():
        shutil.rmtree(output)
    os.replace(partial, output)
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

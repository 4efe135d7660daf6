"""Pruning a model dispatched by accelerate (``device_map`` with "cpu" or "disk" entries).

Such a model keeps each offloaded module's parameters on the ``meta`` device and their values in its
``AlignDevicesHook.weights_map``: a ``PrefixedDataset`` over a dict of host tensors ("cpu") or over an
``OffloadedWeightsLoader`` that reads them from files ("disk"). The engine must read the values from
there and write the pruned ones back there, because that map is what the hooks load at forward time
and what ``PreTrainedModel.save_pretrained`` reads (``load_offloaded_parameter``) for meta tensors.

- host-offloaded values are replaced in their dict (a new tensor: the old one may be memory-mapped
  from the source checkpoint);
- disk-offloaded values are written to a new single-tensor safetensors file (written to a temporary
  name, then renamed) and the loader's index entry is pointed at it. The original files are never
  rewritten: transformers' index points straight into the source checkpoint's shards.

During the block loop the hooks' forwards are switched off, so they neither move nor reload weights
behind the engine's back; the engine places everything itself and the hooks come back afterwards.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import weakref
from collections.abc import Iterator, Mapping, MutableMapping

import torch
from accelerate.hooks import AlignDevicesHook, SequentialHook
from accelerate.utils import OffloadedWeightsLoader, PrefixedDataset
from safetensors.torch import save_file
from torch import nn

from .targets import Target

_META = torch.device("meta")


def is_dispatched(model: nn.Module) -> bool:
    """Whether accelerate hooks sit on the model (``from_pretrained(device_map=...)``, ``dispatch_model``,
    ``cpu_offload``...): then blocks must be placed by ``OffloadedBlockStore``, not ``.to()``."""
    return any(hasattr(m, "_hf_hook") for m in model.modules())


def _offload_hooks(module: nn.Module) -> Iterator[AlignDevicesHook]:
    hook = getattr(module, "_hf_hook", None)
    hooks = hook.hooks if isinstance(hook, SequentialHook) else [hook]
    for h in hooks:
        if isinstance(h, AlignDevicesHook) and h.offload and h.weights_map is not None:
            yield h


def _source(root: nn.Module, name: str) -> tuple[Mapping, str] | None:
    """``(weights_map, key)`` holding tensor ``name`` (relative to ``root``), or None when no hook
    offloads it. Looks from the owning module upwards, like transformers' ``load_offloaded_parameter``:
    a hook with ``place_submodules`` holds its submodules' tensors too."""
    parts = name.split(".")
    for depth in range(len(parts) - 1, -1, -1):
        path = ".".join(parts[:depth])
        try:
            module = root.get_submodule(path)
        except AttributeError:
            continue
        for hook in _offload_hooks(module):
            if depth == len(parts) - 1 or hook.place_submodules:
                return hook.weights_map, ".".join(parts[depth:])
    return None


def offloaded_tensor(root: nn.Module, name: str) -> torch.Tensor | None:
    """The current value of offloaded tensor ``name`` (relative to ``root``) from its weights map."""
    found = _source(root, name)
    if found is None:
        return None
    weights_map, key = found
    try:
        return weights_map[key]
    except KeyError:
        return None


def stored_weight(model: nn.Module, target: Target) -> torch.Tensor:
    """``target.stored()``, read from the weights map when the module's weight is offloaded (meta)."""
    w = target.stored()
    if w.device.type != "meta":
        return w
    full = offloaded_tensor(model, target.state_key)
    if full is None:
        raise RuntimeError(f"{target.state_key} is on the meta device and no accelerate hook holds its value")
    return full[target.expert] if target.expert is not None else full


# ------------------------------------------------------------------------------------- writing back
def _writeback_dir(loader: OffloadedWeightsLoader) -> str:
    """A private folder for the pruned tensors of a disk-offloaded model, beside the offload folder
    when there is one (the user chose that disk for offloading), removed with the loader."""
    folder = getattr(loader, "_statprune_dir", None)
    if folder is None:
        base = loader.save_folder if loader.save_folder and os.path.isdir(loader.save_folder) else None
        folder = tempfile.mkdtemp(prefix=".statprune-pruned-", dir=base)
        loader._statprune_dir = folder
        weakref.finalize(loader, shutil.rmtree, folder, True)
    return folder


def _write_file(folder: str, key: str, value: torch.Tensor) -> str:
    path = os.path.join(folder, f"{key}.safetensors")
    tmp = os.path.join(folder, f".{key}.{os.getpid()}.tmp")
    try:
        save_file({key: value.detach().to("cpu").contiguous()}, tmp)
        os.replace(tmp, path)  # readers open the file per access: never a half-written tensor
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    return path


def put_offloaded(weights_map: Mapping, key: str, value: torch.Tensor) -> None:
    """Make ``weights_map[key]`` return ``value`` from now on, in the storage the map already uses."""
    dataset = weights_map
    while isinstance(dataset, PrefixedDataset):
        key = dataset.prefix + key
        dataset = dataset.dataset
    if isinstance(dataset, OffloadedWeightsLoader):
        sibling = key.rsplit(".", 1)[0] + "."
        on_disk = key in dataset.index or (
            key not in dataset.state_dict and any(k.startswith(sibling) for k in dataset.index)
        )
        if on_disk:
            path = _write_file(_writeback_dir(dataset), key, value)
            dtype = str(value.dtype).removeprefix("torch.")
            dataset.index[key] = {"safetensors_file": path, "weight_name": key, "dtype": dtype}
        else:
            dataset.state_dict[key] = value.detach().to("cpu")
        if key not in dataset.all_keys:
            dataset.all_keys.append(key)
    elif isinstance(dataset, MutableMapping):
        dataset[key] = value.detach().to("cpu")
    else:
        raise TypeError(f"cannot write pruned weights into an accelerate weights map of type {type(dataset).__name__}")


# ------------------------------------------------------------------------------------- placement
def _tensors(module: nn.Module, skip: str | None = None) -> Iterator[tuple[str, nn.Module, str, torch.Tensor, bool]]:
    """``(name, owner, attribute, tensor, is_parameter)`` for every parameter and buffer under ``module``,
    except those under the submodule ``skip``."""
    for path, owner in module.named_modules():
        if skip is not None and (path == skip or path.startswith(skip + ".")):
            continue
        prefix = f"{path}." if path else ""
        for attr, t in list(owner._parameters.items()):
            if t is not None:
                yield prefix + attr, owner, attr, t, True
        for attr, t in list(owner._buffers.items()):
            if t is not None:
                yield prefix + attr, owner, attr, t, False


def _swap(owner: nn.Module, attr: str, is_param: bool, value: torch.Tensor) -> None:
    (owner._parameters if is_param else owner._buffers)[attr] = value


class _Placement:
    """Where one module's tensors were before ``onload``: offloaded ones keep their meta object (put
    back as they were, so tied or shared references survive), others their device."""

    def __init__(self) -> None:
        self.offloaded: dict[str, tuple[nn.Module, str, bool, torch.Tensor]] = {}
        self.homes: dict[str, torch.device] = {}


def onload(
    module: nn.Module, device: torch.device, root: nn.Module | None = None, prefix: str = "", skip: str | None = None
) -> _Placement:
    """Put every tensor of ``module`` on ``device``: offloaded ones are read from their weights map (a
    copy, so pruning in place never writes into the map's tensor), the others are moved. Tensors
    shared by several modules are materialised once."""
    root = module if root is None else root
    placement = _Placement()
    done: dict[int, torch.Tensor] = {}
    for name, owner, attr, t, is_param in _tensors(module, skip):
        if t.device.type == "meta":
            if id(t) not in done:
                value = offloaded_tensor(root, prefix + name)
                if value is None:
                    continue  # a meta tensor nobody holds (left alone, as the hooks would)
                value = value.to(device=device, dtype=t.dtype if t.is_floating_point() else value.dtype, copy=True)
                done[id(t)] = nn.Parameter(value, requires_grad=t.requires_grad) if is_param else value
            placement.offloaded[name] = (owner, attr, is_param, t)
            _swap(owner, attr, is_param, done[id(t)])
        else:
            placement.homes[name] = t.device
            if t.device != device:
                t.data = t.data.to(device)
    return placement


def offload(
    module: nn.Module,
    placement: _Placement,
    write: bool,
    root: nn.Module | None = None,
    prefix: str = "",
    skip: str | None = None,
) -> None:
    """Undo ``onload``; with ``write``, first store every offloaded parameter's current value (and any
    parameter added since, e.g. a compensation bias on an offloaded linear) in its weights map."""
    root = module if root is None else root
    written: set[int] = set()
    for name, owner, attr, t, is_param in _tensors(module, skip):
        if name in placement.offloaded:
            _, _, _, original = placement.offloaded[name]
            if write and is_param and id(t) not in written:
                found = _source(root, prefix + name)
                if found is not None:
                    put_offloaded(*found, t)
                    written.add(id(t))
            _swap(owner, attr, is_param, original)
        elif name in placement.homes:
            if t.device != placement.homes[name]:
                t.data = t.data.to(placement.homes[name])
        elif write and is_param and t.device.type != "meta":  # new since onload (a compensation bias)
            found = _source(root, prefix + name)
            if found is not None:
                put_offloaded(*found, t)
                _swap(owner, attr, is_param, nn.Parameter(t.detach().to(_META), requires_grad=t.requires_grad))


class OffloadedBlockStore:
    """``BlockStore`` for the blocks of a dispatched model: ``load`` materialises a block's offloaded
    weights on the compute device from the weights map (and moves the rest there); ``store`` writes the
    pruned weights back into the map and returns the block to meta, so host and device memory hold at
    most one block's weights beyond what the user's device_map already placed."""

    def __init__(self, blocks: nn.ModuleList, root: nn.Module | None = None, blocks_path: str = ""):
        """``root`` is the model the hooks were attached from and ``blocks_path`` the blocks' path in it;
        without them, ``blocks`` itself is the root (hooks above it are not searched)."""
        self.blocks = blocks
        self.root = root if root is not None else blocks
        self.prefix = f"{blocks_path}." if root is not None and blocks_path else ""
        self._placements: dict[int, _Placement] = {}

    def _args(self, index: int) -> dict:
        return {"root": self.root, "prefix": f"{self.prefix}{index}."}

    def load(self, index: int, device: torch.device, original: bool = False) -> nn.Module:
        # Nothing is pruned before the first ``store``, so the current weights are the original ones.
        block = self.blocks[index]
        self._placements[index] = onload(block, device, **self._args(index))
        return block

    def store(self, index: int, block: nn.Module) -> None:
        offload(block, self._placements.pop(index), True, **self._args(index))

    def release(self, index: int, block: nn.Module) -> None:
        offload(block, self._placements.pop(index), False, **self._args(index))


@contextlib.contextmanager
def hooks_disabled(model: nn.Module) -> Iterator[None]:
    """Run every hooked module's own forward: the engine places weights and inputs itself, and an
    offloading hook would otherwise reload stale weights or throw pruned ones away mid-block."""
    saved: list[tuple[nn.Module, object]] = []
    for module in model.modules():
        if hasattr(module, "_hf_hook") and hasattr(module, "_old_forward") and "forward" in module.__dict__:
            saved.append((module, module.__dict__["forward"]))
            module.forward = module._old_forward
    try:
        yield
    finally:
        for module, forward in saved:
            module.forward = forward


@contextlib.contextmanager
def onloaded_outside(model: nn.Module, blocks_path: str, device: torch.device) -> Iterator[None]:
    """Materialise the offloaded tensors outside the blocks (embeddings, final norm, ``lm_head``) on
    ``device`` for the capture pass, and return them to their weights map (unchanged) afterwards."""
    placement = onload(model, device, skip=blocks_path)
    try:
        yield
    finally:
        offload(model, placement, False, skip=blocks_path)

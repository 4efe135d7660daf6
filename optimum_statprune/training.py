"""Fine-tune a pruned model without losing its zeros.

An optimizer step updates every weight that has a gradient, and pruned weights do get gradients, so a
few steps of plain fine-tuning turn a 50% sparse model dense again. ``SparsityMasks`` records which
weights are pruned (the zeros of the targeted tensors) and writes those zeros back; the
``SparsityPreservingCallback`` does that for ``transformers.Trainer`` right after every optimizer step
(``on_optimizer_step``), and also zeroes the gradients of pruned weights just before it, so the
optimizer's moments stay zero there too.

LoRA trains a dense low-rank delta ``B @ A`` beside frozen, still sparse, base weights: sparsity holds
while the adapter stays separate. ``merge_and_unload()`` adds the dense delta into the base weights and
fills the pruned positions; ``remask_merged_lora`` zeroes them again. That drops the part of the learned
delta that sat on pruned positions (about the sparsity's share of it), so the merged model is not exactly
base + adapter: ``remask_merged_lora`` returns how much was dropped.

Which tensors are targeted: the manifest's layers (``tensor`` keys) when a manifest is given, else every
prunable weight inside the decoder blocks (``engine.targets.find_blocks`` / ``find_targets``). PEFT wrappers are
seen through: ``base_model.model.`` prefixes and ``.base_layer`` segments are ignored when matching names.
Parameters sharded by FSDP or DeepSpeed ZeRO-3 are not supported (their shapes differ from the masks).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

logger = logging.getLogger(__name__)

_PEFT_PREFIX = "base_model.model."


def canonical_name(name: str) -> str:
    """A parameter's name in the plain model: PEFT's ``base_model.model.`` prefix and ``.base_layer``
    segments removed."""
    if name.startswith(_PEFT_PREFIX):
        name = name[len(_PEFT_PREFIX) :]
    return name.replace(".base_layer.", ".")


def _parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Canonical name -> parameter, adapter weights (LoRA, modules_to_save copies) left out."""
    out: dict[str, nn.Parameter] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if ".lora_" in name or "modules_to_save" in name or ".original_module." in name:
            continue
        out.setdefault(canonical_name(name), param)
    return out


def _manifest_keys(manifest: dict[str, Any] | str | os.PathLike) -> tuple[list[str], dict[str, int]]:
    """Targeted tensor keys of a manifest (dict, file or directory) and the zeros each should have."""
    if not isinstance(manifest, dict):
        from .sharing.verify import load_manifest

        manifest = load_manifest(manifest)
    keys: list[str] = []
    pruned: dict[str, int] = {}
    for rec in manifest.get("layers", []):
        key = rec.get("tensor")
        if not key:
            raise ValueError(f"manifest layer {rec.get('name')!r} names no tensor; cannot find its weight")
        if key not in pruned:
            keys.append(key)
            pruned[key] = 0
        n = 1
        for s in rec["shape"]:
            n *= int(s)
        pruned[key] += round(float(rec["sparsity"]) * n)
    return keys, pruned


def _block_keys(model: nn.Module, blocks: str | None) -> list[str]:
    """Keys of every prunable weight inside the decoder blocks (the engine's own target rules)."""
    from .engine.targets import find_blocks, find_targets

    path, block_list = find_blocks(model, blocks)
    names = {id(p): canonical_name(n) for n, p in model.named_parameters(remove_duplicate=False)}
    keys: list[str] = []
    for i, block in enumerate(block_list):
        for target in find_targets(block, f"{path}.{i}"):
            key = names.get(id(getattr(target.module, target.param)))
            if key is not None and ".lora_" not in key and key not in keys:
                keys.append(key)
    return keys


class SparsityMasks:
    """Boolean keep-masks (True = kept) of a pruned model's targeted weights, by canonical name.

    >>> masks = SparsityMasks.from_model(model)            # or manifest="pruned-dir"
    >>> handle = masks.attach(optimizer, model)            # plain PyTorch: re-mask after every step
    >>> masks.violations(model)                            # {} while sparsity is exact

    Memory: one byte per targeted weight, kept on the weights' device.
    """

    def __init__(self, masks: dict[str, torch.Tensor]):
        self.masks = masks

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        manifest: dict[str, Any] | str | os.PathLike | None = None,
        blocks: str | None = None,
    ) -> SparsityMasks:
        """Capture the zeros of the targeted weights: the manifest's tensors, else every prunable weight
        in the decoder blocks. Raises if a manifest tensor is missing or nothing is sparse."""
        params = _parameters(model)
        expected: dict[str, int] = {}
        if manifest is not None:
            keys, expected = _manifest_keys(manifest)
            missing = [k for k in keys if k not in params]
            if missing:
                raise KeyError(f"the model has no parameter(s) {missing[:3]} named by the manifest; is it the pruned model?")
        else:
            keys = _block_keys(model, blocks)
        masks: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for key in keys:
                masks[key] = params[key] != 0
                zeros = int((~masks[key]).sum())
                if key in expected and zeros < expected[key]:
                    logger.warning(
                        "%s has %d zeros but the manifest pruned %d: the model has changed since pruning; "
                        "the current zeros are kept", key, zeros, expected[key],
                    )
        result = cls(masks)
        if result.pruned == 0:
            raise ValueError("none of the targeted weights has a zero: is this the pruned model?")
        logger.info("captured sparsity masks of %d tensors (%.2f%% pruned)", len(masks), 100 * result.sparsity)
        return result

    def __len__(self) -> int:
        return len(self.masks)

    @property
    def pruned(self) -> int:
        return sum(int((~m).sum()) for m in self.masks.values())

    @property
    def sparsity(self) -> float:
        total = sum(m.numel() for m in self.masks.values())
        return self.pruned / total if total else 0.0

    def _pairs(self, model: nn.Module, trainable_only: bool = False) -> Iterable[tuple[str, nn.Parameter, torch.Tensor]]:
        params = _parameters(model)
        for key, mask in self.masks.items():
            param = params.get(key)
            if param is None:
                raise KeyError(f"{key} is not a parameter of this model (was it restructured?)")
            if trainable_only and not param.requires_grad:
                continue
            if param.shape != mask.shape:
                raise ValueError(
                    f"{key}: parameter shape {tuple(param.shape)} differs from its mask {tuple(mask.shape)} "
                    "(sharded by FSDP / ZeRO-3? those are not supported)"
                )
            if mask.device != param.device:
                mask = self.masks[key] = mask.to(param.device)
            yield key, param, mask

    @torch.no_grad()
    def apply(self, model: nn.Module, trainable_only: bool = False) -> None:
        """Zero the pruned weights of ``model`` in place."""
        for _, param, mask in self._pairs(model, trainable_only):
            param.masked_fill_(~mask, 0)

    @torch.no_grad()
    def mask_gradients(self, model: nn.Module) -> None:
        """Zero the gradients of pruned weights (keeps optimizer moments at zero there)."""
        for _, param, mask in self._pairs(model, trainable_only=True):
            if param.grad is not None:
                param.grad.masked_fill_(~mask, 0)

    @torch.no_grad()
    def violations(self, model: nn.Module) -> dict[str, int]:
        """``{key: number of pruned weights that are nonzero}``, only for tensors with violations."""
        out = {}
        for key, param, mask in self._pairs(model):
            bad = int((param[~mask] != 0).sum())
            if bad:
                out[key] = bad
        return out

    def attach(self, optimizer: torch.optim.Optimizer, model: nn.Module):
        """Re-mask ``model`` after every ``optimizer.step()`` (plain PyTorch loops); returns the hook
        handle (``handle.remove()`` detaches it)."""
        self.apply(model)
        return optimizer.register_step_post_hook(lambda *_: self.apply(model, trainable_only=True))


class SparsityPreservingCallback(TrainerCallback):
    """Keep a pruned model's zeros through ``Trainer`` fine-tuning.

    Masks are captured at ``on_train_begin`` (from ``manifest`` when given, else from the zeros of the
    decoder blocks' prunable weights) unless ``masks`` is passed; gradients of pruned weights are zeroed
    before each optimizer step and the weights re-masked after it. ``violations`` after training is 0.
    """

    def __init__(
        self,
        manifest: dict[str, Any] | str | os.PathLike | None = None,
        masks: SparsityMasks | None = None,
        blocks: str | None = None,
        mask_gradients: bool = True,
    ):
        self.manifest = manifest
        self.masks = masks
        self.blocks = blocks
        self.mask_gradients = mask_gradients

    def on_train_begin(self, args, state, control, model: nn.Module | None = None, **kwargs):
        if model is None:
            raise RuntimeError("SparsityPreservingCallback needs the model; use it with transformers.Trainer")
        if self.masks is None:
            self.masks = SparsityMasks.from_model(model, self.manifest, self.blocks)
        self.masks.apply(model)
        return control

    def on_pre_optimizer_step(self, args, state, control, model: nn.Module | None = None, **kwargs):
        if self.mask_gradients and model is not None and self.masks is not None:
            self.masks.mask_gradients(model)
        return control

    def on_optimizer_step(self, args, state, control, model: nn.Module | None = None, **kwargs):
        if model is not None and self.masks is not None:
            self.masks.apply(model, trainable_only=True)
        return control

    def on_train_end(self, args, state, control, model: nn.Module | None = None, **kwargs):
        if model is not None and self.masks is not None:
            bad = self.masks.violations(model)
            if bad:
                logger.warning("sparsity was not preserved in %d tensors: %s", len(bad), dict(list(bad.items())[:5]))
            else:
                logger.info("sparsity preserved: %.2f%% of the targeted weights are zero", 100 * self.masks.sparsity)
        return control


@torch.no_grad()
def remask_merged_lora(model: nn.Module, masks: SparsityMasks) -> dict[str, Any]:
    """Zero the pruned positions of a model after ``peft_model.merge_and_unload()``.

    Merging adds LoRA's dense ``B @ A`` to every weight it adapts, pruned positions included. Re-masking
    restores the sparsity and drops that part of the delta. Returns ``{"removed": {key: fraction},
    "removed_total": fraction}``, each fraction ``‖W ⊙ (1 − M)‖ / ‖W‖`` of the merged weight: what the
    re-masking threw away, relative to the weight (0 for tensors LoRA did not touch).
    """
    removed: dict[str, float] = {}
    dropped_sq = 0.0
    total_sq = 0.0
    for key, param, mask in masks._pairs(model):
        w = param.detach().float()
        gone = float(w[~mask].pow(2).sum())
        full = float(w.pow(2).sum())
        if gone:
            removed[key] = (gone / full) ** 0.5 if full else 0.0
        dropped_sq += gone
        total_sq += full
        param.masked_fill_(~mask, 0)
    total = (dropped_sq / total_sq) ** 0.5 if total_sq else 0.0
    if removed:
        logger.info("re-masked %d merged tensors; dropped %.3f of the weights' norm", len(removed), total)
    return {"removed": removed, "removed_total": total}

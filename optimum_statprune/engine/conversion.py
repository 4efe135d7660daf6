"""Transformers' checkpoint conversions, applied one block at a time.

Transformers 5 converts some checkpoints as it loads them. Mixtral's per-expert ``w1``/``w2``/``w3``
tensors become one fused ``mlp.experts.gate_up_proj`` and ``down_proj``, and ``save_pretrained``
converts them back. ``from_pretrained`` does this for the whole state dict at once; streaming must do
it block by block with the same result. So this module drives transformers' own ``WeightConverter``
and ``WeightRenaming`` objects on one block's tensors at a time, rather than reimplementing any
conversion.
"""

from __future__ import annotations

from collections.abc import Iterable
from copy import deepcopy

import torch
from torch import nn
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import (
    WeightConverter,
    WeightRenaming,
    dot_natural_key,
    rename_source_key,
    revert_weight_conversion,
)


class CheckpointConversion:
    """The load-time conversions of ``model`` that its checkpoint's keys actually use.

    As in ``from_pretrained``, the model remembers the conversions used (``_weight_conversions``), so
    reverting one block's tensors gives exactly what ``save_pretrained`` of the in-memory model would
    write. ``active`` is False when nothing needs converting; then both directions return their input
    unchanged."""

    def __init__(self, model: nn.Module, checkpoint_keys: Iterable[str]):
        mapping = get_model_conversion_mapping(model)
        self.model = model
        self._renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
        self._converters = [m for m in mapping if isinstance(m, WeightConverter)]
        self._by_pattern = {p: c for c in self._converters for p in c.source_patterns}
        self._prefix = getattr(model, "base_model_prefix", None)
        self._meta = model.state_dict()  # shapes and names only: the model is on the meta device
        self._names = {key: self._rename(key) for key in checkpoint_keys}
        used = [m for m in mapping if m.was_used()]
        self.active = any(renamed != key for key, (renamed, _) in self._names.items()) or any(
            isinstance(m, WeightConverter) for m in used
        )
        model._weight_conversions = used  # what from_pretrained records for save_pretrained to revert

    def _rename(self, key: str) -> tuple[str, str | None]:
        renamed, pattern = rename_source_key(key, self._renamings, self._converters, self._prefix, self._meta)
        if renamed not in self._meta and key in self._meta:  # as from_pretrained: a key the model has as is
            renamed, pattern = key, None
        return renamed, pattern

    def to_model(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Checkpoint tensors (full keys) under the model's names and layouts. A key that maps to nothing
        in the model is kept under its own name, for the caller's key check to report."""
        if not self.active:
            return tensors
        pending: dict[str, WeightRenaming | WeightConverter] = {}
        out: dict[str, torch.Tensor] = {}
        for key in sorted(tensors, key=dot_natural_key):  # the order fused experts are stacked in
            renamed, pattern = self._names.get(key) or self._rename(key)
            if renamed not in self._meta:
                out[key] = tensors[key]
                continue
            if pattern is None:
                mapping = pending.setdefault(renamed, WeightRenaming(key, renamed))
                pattern = key
            else:
                mapping = pending.setdefault(renamed, deepcopy(self._by_pattern[pattern]))
            mapping.add_tensor(renamed, key, pattern, tensors[key])
        for first, mapping in pending.items():
            for name, value in mapping.convert(first, model=self.model, config=self.model.config).items():
                out[name] = value[0] if isinstance(value, list) else value
        return out

    def to_checkpoint(self, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Model tensors (full keys) under the checkpoint's names and layouts, contiguous for safetensors."""
        if not self.active:
            return tensors
        return {k: v.contiguous() for k, v in revert_weight_conversion(self.model, tensors).items()}

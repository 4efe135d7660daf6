"""Biases that bias compensation added (``add_bias=True``) must survive a save and a reload.

A Llama-style model has no bias on its linears unless its config says so (``attention_bias``,
``mlp_bias``); saved as they are, added biases would be dropped without a word by
``from_pretrained``. Before saving, the config flags that make the architecture create them are turned
on, and the linears those flags also cover get zero biases (their outputs are unchanged).
"""

from __future__ import annotations

import copy
import itertools
import logging

import torch
from torch import nn

logger = logging.getLogger(__name__)

BIAS_FLAGS = ("attention_bias", "mlp_bias")
"""Config flags under which transformers architectures give their linears biases."""


def _keys(model: nn.Module, config) -> set[str]:
    with torch.device("meta"):
        return set(type(model)(config).state_dict())


def declare_added_biases(model: nn.Module) -> list[str]:
    """Turn on the config flags that describe the biases bias compensation added, give zero biases to the
    other linears those flags cover, and return the flags set (empty when nothing was added).

    Raises ValueError when no combination of flags describes them: the reload would lose them."""
    have = set(model.state_dict())
    added = sorted(k for k in have - _keys(model, model.config) if k.endswith(".bias"))
    if not added:
        return []
    candidates = [f for f in BIAS_FLAGS if getattr(model.config, f, None) is False]
    for n in range(1, len(candidates) + 1):
        for flags in itertools.combinations(candidates, n):
            config = copy.deepcopy(model.config)
            for f in flags:
                setattr(config, f, True)
            keys = _keys(model, config)
            missing = keys - have
            if not have <= keys or any(not k.endswith(".bias") for k in missing):
                continue
            for k in sorted(missing):
                module = model.get_submodule(k.removesuffix(".bias"))
                w = module.weight
                device = w.device if w.device.type != "meta" else torch.device("cpu")
                module.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=device))
            for f in flags:
                setattr(model.config, f, True)
            logger.info("bias compensation added %d biases: set %s (and %d zero biases)", len(added),
                        ", ".join(flags), len(missing))
            return list(flags)
    raise ValueError(
        f"bias compensation added biases (e.g. {added[0]}) that {type(model).__name__}'s config cannot "
        "describe, so a reload would drop them; prune with add_bias=False or another compensation"
    )

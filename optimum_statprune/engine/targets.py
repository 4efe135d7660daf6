"""Model plumbing: where the decoder blocks are and which weights inside them are pruned.

Blocks are found generically: the ``nn.ModuleList`` whose length is the config's number of hidden
layers. Inside a block, the targets are every ``nn.Linear``, GPT-2 style ``Conv1D`` and fused MoE expert
tensor (transformers' ``gate_up_proj`` / ``down_proj`` of shape ``[experts, out, in]``). Routers are
never pruned, and nothing outside the blocks (embeddings, final norm, ``lm_head``) ever is.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

# Linears that route tokens rather than transform them: pruning them changes which experts run.
ROUTER_PATTERN = re.compile(r"(^|\.)(gate|router|shared_expert_gate)$")
FUSED_EXPERT_PARAMS = ("gate_up_proj", "down_proj")


class UnsupportedModelError(ValueError):
    """The model's decoder blocks or weights could not be located."""


class NoTargetsError(ValueError):
    """The ``targets``/``ignore`` patterns leave no weight to prune in any block."""


@dataclass
class Target:
    """One prunable weight: a linear's ``weight``, or one expert's slice of a fused expert tensor."""

    name: str
    module: nn.Module
    kind: str  # "linear" | "conv1d" | "expert"
    param: str = "weight"
    expert: int | None = None

    @property
    def transposed(self) -> bool:
        """Whether the stored tensor is ``[d_in, d_out]`` (GPT-2 ``Conv1D``, transposed fused experts)."""
        return self.kind == "conv1d" or (self.kind == "expert" and bool(getattr(self.module, "is_transposed", False)))

    def weight(self) -> torch.Tensor:
        """The weight as ``[d_out, d_in]`` (a view of the module's storage)."""
        w = getattr(self.module, self.param)
        if self.expert is not None:
            w = w[self.expert]
        return w.T if self.transposed else w

    def stored(self) -> torch.Tensor:
        """The weight in the layout the checkpoint stores it (``Conv1D`` is ``[d_in, d_out]``)."""
        w = getattr(self.module, self.param)
        return w[self.expert] if self.expert is not None else w

    def set_weight(self, value: torch.Tensor) -> None:
        """Write ``value`` (``[d_out, d_in]``) back in the module's layout and dtype."""
        with torch.no_grad():
            self.weight().copy_(value.to(self.weight().dtype))

    @property
    def state_key(self) -> str:
        """The state-dict key of the tensor this weight lives in (the whole fused tensor for experts)."""
        if self.kind == "expert":
            return f"{self.name.rsplit('.', 2)[0]}.{self.param}"
        return f"{self.name}.{self.param}"

    @property
    def bias(self) -> torch.Tensor | None:
        if self.kind == "expert":
            return None
        return getattr(self.module, "bias", None)

    @property
    def in_features(self) -> int:
        return self.weight().shape[1]


def text_config(model: nn.Module):
    """The language model's config (the text part of a multimodal config), or None."""
    config = getattr(model, "config", None)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def hidden_size(model: nn.Module) -> int:
    """Width of the hidden states between blocks (what capture keeps per token)."""
    config = text_config(model)
    for name in ("hidden_size", "n_embd", "d_model"):
        if getattr(config, name, None):
            return int(getattr(config, name))
    return model.get_input_embeddings().weight.shape[1]


def find_blocks(model: nn.Module, blocks: str | None = None) -> tuple[str, nn.ModuleList]:
    """Return ``(path, ModuleList)`` of the decoder blocks; ``blocks`` names the path explicitly."""
    if blocks is not None:
        try:
            found = model.get_submodule(blocks)
        except AttributeError as e:
            raise UnsupportedModelError(f"the model has no submodule {blocks!r}") from e
        if not isinstance(found, nn.ModuleList):
            raise UnsupportedModelError(f"{blocks!r} is a {type(found).__name__}, not an nn.ModuleList of blocks")
        return blocks, found
    n_layers = getattr(text_config(model), "num_hidden_layers", None)
    candidates = [
        (name, mod)
        for name, mod in model.named_modules()
        if isinstance(mod, nn.ModuleList)
        and len(mod) > 0
        and (n_layers is None or len(mod) == n_layers)
        and len({type(m) for m in mod}) == 1
        and not any(isinstance(m, (nn.Linear, Conv1D)) for m in mod)
    ]
    # Nested lists of the right length (e.g. experts) sit below the blocks: keep the outermost.
    outer = [(n, m) for n, m in candidates if not any(n != o and n.startswith(o + ".") for o, _ in candidates)]
    if len(outer) != 1:
        found_names = ", ".join(n for n, _ in outer) or "none"
        raise UnsupportedModelError(
            f"cannot tell which module list holds the decoder blocks of {type(model).__name__} "
            f"(candidates: {found_names}); name it explicitly, e.g. blocks='model.layers'"
        )
    return outer[0]


def _is_fused_experts(module: nn.Module) -> bool:
    return all(
        isinstance(getattr(module, p, None), nn.Parameter) and getattr(module, p).dim() == 3 for p in FUSED_EXPERT_PARAMS
    )


def find_targets(
    block: nn.Module, prefix: str, targets: list[str] | None = None, ignore: list[str] | None = None
) -> list[Target]:
    """Prunable weights of one block, in module order, filtered by ``targets`` / ``ignore`` regexes
    (matched with ``re.search`` against the full module name)."""
    found: list[Target] = []
    for rel, module in block.named_modules():
        name = f"{prefix}.{rel}" if rel else prefix
        if isinstance(module, (nn.Linear, Conv1D)):
            if ROUTER_PATTERN.search(name):
                continue
            found.append(Target(name, module, "conv1d" if isinstance(module, Conv1D) else "linear"))
        elif _is_fused_experts(module):
            if getattr(module, "has_bias", False) or not getattr(module, "has_gate", True):
                raise UnsupportedModelError(
                    f"{name}: fused experts with biases or without a gate are not supported yet; "
                    f"exclude them with ignore=[{name!r}]"
                )
            n_experts = module.gate_up_proj.shape[0]
            for e in range(n_experts):
                for p in FUSED_EXPERT_PARAMS:
                    found.append(Target(f"{name}.{e}.{p}", module, "expert", p, e))
    if targets:
        found = [t for t in found if any(re.search(p, t.name) for p in targets)]
    if ignore:
        found = [t for t in found if not any(re.search(p, t.name) for p in ignore)]
    return found


def check_targets_found(
    blocks: Sequence[nn.Module] | None,
    n_blocks: int,
    prefix: str,
    targets: list[str] | None = None,
    ignore: list[str] | None = None,
) -> None:
    """``NoTargetsError`` if ``targets``/``ignore`` select no weight in any of the blocks, naming the
    patterns and a few weights that exist; checked before anything is pruned.

    Every block is looked at, not only block 0, because a pattern may name one block
    (``targets=["layers\\.3\\."]``). Reading module names costs nothing; the blocks may be on the meta
    device. ``blocks`` None (a store that cannot show them) skips the check."""
    if blocks is None or not (targets or ignore):
        return
    for i in range(n_blocks):
        if find_targets(blocks[i], f"{prefix}.{i}", targets, ignore):
            return
    existing = [t.name for t in find_targets(blocks[0], f"{prefix}.0")] if n_blocks else []
    shown = ", ".join(existing[:6]) + (", ..." if len(existing) > 6 else "")
    raise NoTargetsError(
        f"targets={targets!r} with ignore={ignore or []!r} select no weight in the {n_blocks} blocks of {prefix} "
        f"(patterns are regular expressions searched in full module names); weights that exist: {shown or 'none'}"
    )

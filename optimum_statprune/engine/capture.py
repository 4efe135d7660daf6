"""Capture: run the model once with every decoder block replaced by a recorder, keeping what block 0
receives and every block's own keyword arguments; and ``call_block``, which replays a block on them.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

logger = logging.getLogger(__name__)


class Stop(Exception):
    """Raised from a hook to end a forward pass early once everything needed was seen."""


@dataclass
class CalibrationBatch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None = None  # [B, T], 1 = real token; None = no padding


@dataclass
class BlockInputs:
    """Per micro-batch: the hidden states entering the block, and each block's other arguments."""

    hidden: list[torch.Tensor]
    hidden_as_kwarg: bool
    args: list[list[tuple]]  # [block][batch] positional args after hidden_states
    kwargs: list[list[dict[str, Any]]]  # [block][batch]
    token_masks: list[torch.Tensor | None]
    on_host: bool = False  # hidden states kept in (pinned) host memory between blocks
    device: torch.device | None = None  # where the blocks run


def _move_outside(model: nn.Module, blocks_path: str, device: torch.device) -> dict[str, torch.device]:
    """Move every parameter and buffer outside the blocks to ``device``; return where each was."""
    homes: dict[str, torch.device] = {}
    for name, module in model.named_modules():
        if name == blocks_path or name.startswith(blocks_path + "."):
            continue
        for pname, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            homes[f"{name}.{pname}"] = t.device
            if t.device != device:
                t.data = t.data.to(device)
    return homes


def _restore_outside(model: nn.Module, homes: dict[str, torch.device]) -> None:
    for name, module in model.named_modules():
        for pname, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            home = homes.get(f"{name}.{pname}")
            if home is not None and t.device != home:
                t.data = t.data.to(home)


ACTIVATION_PLACEMENTS = ("auto", "device", "host")


def to_host(t: torch.Tensor) -> torch.Tensor:
    """``t`` on the host; from a GPU, pinned so copying it back can overlap compute, and copied once,
    straight into pinned memory (not to pageable memory first, then pinned)."""
    if not t.is_cuda:
        return t.to("cpu")
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    out.copy_(t)
    return out


def choose_placement(
    placement: str, batches: Sequence[CalibrationBatch], hidden_size: int, dtype: torch.dtype, device: torch.device
) -> bool:
    """True = keep hidden states on the host. ``auto`` keeps them on the GPU when two copies (a block's
    inputs and outputs) fit in half of its free memory, leaving the rest for the block and its work."""
    if placement not in ACTIVATION_PLACEMENTS:
        raise ValueError(f"activations={placement!r}: choose one of {', '.join(ACTIVATION_PLACEMENTS)}")
    if placement != "auto":
        return placement == "host"
    if device.type != "cuda":
        return False
    tokens = sum(b.input_ids.numel() for b in batches)
    need = 2 * tokens * hidden_size * torch.empty((), dtype=dtype).element_size()
    free, _ = torch.cuda.mem_get_info(device)
    on_host = need > free / 2
    logger.info("calibration activations: %.2f GiB, kept on the %s", need / 2**30, "host" if on_host else "GPU")
    return on_host


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module,
    blocks_path: str,
    blocks: nn.ModuleList,
    batches: Sequence[CalibrationBatch],
    device: torch.device,
    on_host: bool = False,
) -> BlockInputs:
    """Run the model with every block replaced by a recorder, so one cheap pass yields block 0's hidden
    states and every block's own keyword arguments (masks and rotary embeddings can differ per block,
    e.g. sliding-window layers). No block's weights are touched."""
    inputs = BlockInputs([], False, [[] for _ in blocks], [[] for _ in blocks], [], on_host, device)
    keep = to_host if on_host else (lambda t: t)
    last = len(blocks) - 1

    def recorder(index: int) -> Callable:
        def record(*args, **kwargs):
            if index == 0:
                if args:
                    inputs.hidden.append(keep(args[0]))
                else:
                    inputs.hidden.append(keep(kwargs["hidden_states"]))
                    inputs.hidden_as_kwarg = True
            rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            inputs.args[index].append(tuple(args[1:]))
            inputs.kwargs[index].append(rest)
            if index == last:
                raise Stop
            return args[0] if args else kwargs["hidden_states"]

        return record

    homes = _move_outside(model, blocks_path, device)
    for i, block in enumerate(blocks):
        block.forward = recorder(i)
    try:
        for batch in batches:
            mask = batch.attention_mask.to(device) if batch.attention_mask is not None else None
            with contextlib.suppress(Stop):
                model(input_ids=batch.input_ids.to(device), attention_mask=mask, use_cache=False)
            inputs.token_masks.append(mask.bool() if mask is not None else None)
    finally:
        for block in blocks:
            del block.forward  # back to the class's forward
        _restore_outside(model, homes)
    if len(inputs.hidden) != len(batches):
        raise RuntimeError("the first decoder block was not reached during calibration")
    return inputs


def call_block(block: nn.Module, inputs: BlockInputs, i: int, b: int, hidden: torch.Tensor) -> torch.Tensor:
    """Block ``i`` on micro-batch ``b``'s captured arguments and ``hidden``; its hidden-state output."""
    args, kwargs = inputs.args[i][b], inputs.kwargs[i][b]
    if inputs.on_host:
        hidden = hidden.to(inputs.device, non_blocking=True)
    out = block(*args, hidden_states=hidden, **kwargs) if inputs.hidden_as_kwarg else block(hidden, *args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out

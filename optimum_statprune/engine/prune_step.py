"""The prune step of one weight, whatever the method: check it is finite -> the method selects (and may
update) -> the steps after the mask -> check again -> write back; and the block-level safety check that
may undo a block's compensations. The block loop checks a group's weights together first and reads the
checks after pruning once per group (``check_weights_finite``, ``BlockReads``).

The steps after the mask are ``after_mask``: the weight update (``engine/update.py``, a reconstruction
from ``X^T X``) or the compensation (the config refuses both at once); the statistics they read join
``StatPruneConfig.statistics``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..config import StatPruneConfig
from ..methods import FALLBACK_METHOD, LayerPruned, Method, get_method
from ..tensor_math.compensation import compensate
from ..tensor_math.stats import LayerStatistics
from .capture import call_block
from .targets import Target
from .update import update_layer

logger = logging.getLogger(__name__)

NO_TOKENS = "no calibration tokens reached this weight"


class NonFiniteError(ValueError):
    """A weight or a block's output holds NaN or Inf. Pruning goes on from each block's outputs, so one
    such value would silently corrupt every later block: the run stops instead, naming the tensor."""


def _non_finite(what: str, bad: int) -> NonFiniteError:
    return NonFiniteError(
        f"{what} holds {bad} non-finite value(s) (NaN or Inf); every later block would inherit them. "
        "Check the checkpoint (and the dtype it is loaded in: float16 overflows above 65504)."
    )


def check_finite(tensor: torch.Tensor, what: str) -> None:
    """Raise ``NonFiniteError`` naming ``what`` unless every entry of ``tensor`` is finite."""
    if not bool(torch.isfinite(tensor).all()):
        raise _non_finite(what, int((~torch.isfinite(tensor)).sum()))


def check_weights_finite(targets: list[Target]) -> None:
    """``check_finite`` of every target's weight with one read from the device for all of them (the first
    non-finite one named), before any of them is pruned."""
    if not targets:
        return
    counts = [(~torch.isfinite(t.weight().detach())).sum() for t in targets]
    device = counts[0].device
    for t, bad in zip(targets, torch.stack([c.to(device) for c in counts]).tolist(), strict=True):
        if bad:
            raise _non_finite(f"{t.name}: the weight before pruning", bad)


class BlockReads:
    """What the host reads of a block's pruned weights (their NaN/Inf counts, their kept counts for the
    records), read from the device once for all of them, by ``finish``.

    Each read makes the host wait for the GPU, which then idles while the host queues the next weight's
    work: the GPU idled 0.47 s in the prune phase of a 7B run (H200 profile), where the host read up to four
    values per weight. A weight that is not finite after pruning is found when ``finish`` runs, so it may
    already be written back (the run stops either way)."""

    def __init__(self):
        self._finite: list[tuple[torch.Tensor, str]] = []
        self._kept: list[tuple[dict[str, Any], torch.Tensor, int]] = []

    def check_finite(self, tensor: torch.Tensor, what: str) -> None:
        self._finite.append(((~torch.isfinite(tensor)).sum(), what))

    def sparsity(self, record: dict[str, Any], mask: torch.Tensor) -> None:
        self._kept.append((record, mask.sum(), mask.numel()))

    def finish(self) -> None:
        """Read everything queued (one synchronisation), fill the records, raise on a non-finite weight."""
        counts = [c for c, _ in self._finite] + [k for _, k, _ in self._kept]
        if not counts:
            return
        device = counts[0].device
        values = torch.stack([c.to(device, torch.int64) for c in counts]).tolist()
        finite, kept = values[: len(self._finite)], values[len(self._finite):]
        for (record, _, numel), k in zip(self._kept, kept, strict=True):
            record["sparsity"] = 1.0 - k / numel
        checks = self._finite
        self._finite, self._kept = [], []
        for (_, what), bad in zip(checks, finite, strict=True):
            if bad:
                raise _non_finite(what, bad)


def cast_finite(tensor: torch.Tensor, dtype: torch.dtype | None, what: str) -> torch.Tensor:
    """``tensor`` in ``dtype`` (floating tensors only), refusing a cast that turns finite values into Inf:
    weights beyond 65504 overflow float16, and a model saved with them would load as garbage."""
    if dtype is None or not tensor.is_floating_point() or tensor.dtype == dtype:
        return tensor
    cast = tensor.to(dtype)
    if not bool(torch.isfinite(cast).all()) and bool(torch.isfinite(tensor).all()):
        peak = float(tensor.abs().max())
        raise NonFiniteError(
            f"{what}: casting to {str(dtype).replace('torch.', '')} overflows (largest |value| {peak:.4g}); "
            "keep the checkpoint's dtype or use bfloat16"
        )
    return cast


def check_model_finite(model: nn.Module, what: str) -> None:
    """Every floating parameter and buffer of ``model`` finite, else ``NonFiniteError`` naming the first."""
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_floating_point() and t.device.type != "meta":
            check_finite(t.detach(), f"{what}: {name}")


@torch.no_grad()
def prune_target(
    target: Target,
    stats: LayerStatistics | None,
    config: StatPruneConfig,
    sparsity: float | None = None,
    uncompensated: list[Uncompensated] | None = None,
    reads: BlockReads | None = None,
) -> dict[str, Any]:
    """Prune one weight in place with the config's method and the steps after its mask; return its manifest
    record. ``sparsity`` overrides the config's (OWL). Where a compensation was applied and
    ``uncompensated`` is a list, the plain pruned weight and the original bias are appended to it, so a
    block-level check can undo the compensation.

    With ``reads`` the caller has checked the weight (``check_weights_finite``), and the check after pruning
    and the record's ``sparsity`` wait for ``reads.finish()``; without it they happen here."""
    w0 = target.weight().detach().to(torch.float32)
    if reads is None:
        check_finite(w0, f"{target.name}: the weight before pruning")
    sparsity = config.effective_sparsity if sparsity is None else sparsity
    method = get_method(config.method)
    record: dict[str, Any] = {"name": target.name, "shape": list(w0.shape), "method": method.name}
    record["transposed"] = target.transposed
    if target.expert is not None:
        record["expert"] = target.expert
    if config.statistics and (stats is None or stats.count == 0):
        # An expert no calibration token was routed to: nothing to calibrate with.
        method, stats = get_method(FALLBACK_METHOD), None
        record["fallback"] = f"{FALLBACK_METHOD}: {NO_TOKENS}"
    record["tokens"] = stats.count if stats is not None else 0
    pruned = method.prune_layer(w0, stats, config, sparsity, target.name)
    record.update(pruned.record)
    weight, mask, bias_delta = after_mask(target, w0, pruned, stats, config, record, uncompensated,
                                          method=method, sparsity=sparsity)
    after = f"{target.name}: the weight after pruning ({method.name})"
    if reads is None:
        check_finite(weight, after)
    else:
        reads.check_finite(weight, after)
    target.set_weight(weight)
    if bias_delta is not None:
        _shift_bias(target, bias_delta)
    record["pattern"] = config.pattern
    if reads is None:
        record["sparsity"] = 1.0 - float(mask.sum()) / mask.numel()
    else:
        reads.sparsity(record, mask)
    # What was checked for NaN/Inf: the weight before and after pruning; the loop adds "block_output".
    record["finite_checked"] = ["weight"]
    return record


def after_mask(
    target: Target,
    w0: torch.Tensor,
    pruned: LayerPruned,
    stats: LayerStatistics | None,
    config: StatPruneConfig,
    record: dict[str, Any],
    uncompensated: list[Uncompensated] | None = None,
    *,
    method: Method | None = None,
    sparsity: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The steps after the mask, whatever method (``method``, at the layer's ``sparsity``) chose it: the
    weight update, or the compensation (with this layer's safety check). Returns the final weight, its
    mask (a gradual update may re-choose it) and a bias shift (or None); writes ``record["update"]``
    (when an update is configured) and ``record["compensation"]``.

    Whether a step runs is decided here (and in ``compensate``) only, and the record says why where it
    does not (no tokens reached the weight; a bias compensation on a layer without a bias)."""
    update = config.resolve("update")
    if update != "none":
        if stats is None:
            record["update"] = {"kind": update, "applied": False, "reason": NO_TOKENS}
        else:
            method = get_method(config.method) if method is None else method
            sparsity = config.effective_sparsity if sparsity is None else sparsity
            pruned, record["update"] = update_layer(target.name, w0, pruned, stats, config, method, sparsity)
    kind = config.resolved_compensation()
    if kind == "none":
        record["compensation"] = {"kind": "none", "applied": False}
        return pruned.weight, pruned.mask, None
    if stats is None and config.statistics:
        record["compensation"] = {"kind": kind, "applied": False, "reason": NO_TOKENS}
        return pruned.weight, pruned.mask, None
    layer_check = config.resolve("safety_check") and config.resolve("safety_scope") == "layer"
    result = compensate(
        w0, pruned.mask, kind, stats.channel if stats is not None else None,
        has_bias=target.bias is not None, add_bias=config.add_bias, ec_steps=config.ec_steps,
        ec_centered=config.ec_centered, ec_clamp=config.ec_clamp, shrink=config.resolve("compensation_shrink"),
        safety_check=layer_check,
        model_weight=target.weight().detach(),  # unchanged so far: w0 in the model's dtype, for the layer check
    )
    if uncompensated is not None and result.record.get("applied"):
        bias = target.bias.detach().clone() if target.bias is not None else None
        uncompensated.append(Uncompensated(target, pruned.weight, bias, result.record))
    record["compensation"] = result.record
    return result.weight, pruned.mask, result.bias_delta


def _shift_bias(target: Target, delta: torch.Tensor) -> None:
    module = target.module
    if module.bias is None:
        weight = target.weight()
        module.bias = nn.Parameter(torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device))
    module.bias.add_(delta.to(module.bias.dtype))


@dataclass
class Uncompensated:
    """A target's weight and bias as they were before compensation, and its compensation record."""

    target: Target
    weight: torch.Tensor
    bias: torch.Tensor | None
    record: dict[str, Any]

    def swap(self) -> None:
        """Exchange the target's current weight and bias with the ones kept here."""
        current_w = self.target.weight().detach().clone()
        current_b = self.target.bias.detach().clone() if self.target.bias is not None else None
        self.target.set_weight(self.weight)
        if self.bias is None:
            if self.target.bias is not None:  # the compensation added a bias the layer did not have
                self.target.module.bias = None
        else:
            module = self.target.module
            if module.bias is None:
                module.bias = nn.Parameter(self.bias.clone())
            else:
                module.bias.data.copy_(self.bias)
        self.weight, self.bias = current_w, current_b


def block_error(block, inputs, i, hidden, reference, batches, reduce: Callable[[float], float] = float) -> float:
    """Squared error of the block's output against ``reference`` over the first ``batches`` batches, summed
    over the processes by ``reduce`` when several run."""
    total = 0.0
    for b in range(batches):
        diff = (call_block(block, inputs, i, b, hidden[b]).float() - reference[b]).square().sum(-1)
        mask = inputs.token_masks[b]
        if mask is not None:
            diff = diff * mask.to(diff.device, diff.dtype)
        total += float(diff.sum())
    return reduce(total)


def block_safety_check(block, inputs, i, hidden, reference, batches, undo: list[Uncompensated],
                       reduce: Callable[[float], float] = float) -> None:
    """Keep the block's compensations only if together they lower the block output's error against the
    dense block; record the decision and both errors in every compensated target's record."""
    err_comp = block_error(block, inputs, i, hidden, reference, batches, reduce)
    for u in undo:
        u.swap()
    err_none = block_error(block, inputs, i, hidden, reference, batches, reduce)
    keep = err_comp < err_none
    if keep:
        for u in undo:
            u.swap()
    for u in undo:
        u.record["block_check"] = {"error_none": err_none, "error_compensated": err_comp}
        u.record["applied"] = keep

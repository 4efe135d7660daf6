"""Corrections applied after the mask is fixed, and the safety check that decides whether to keep them.

All functions are pure tensor math in float32. ``w0`` is the original weight ``[d_out, d_in]``,
``mask`` the bool keep-mask of the same shape. Every returned weight is multiplied by the mask, so a
correction never revives a pruned weight or breaks an N:M group.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .stats import ChannelStats, half_product

_TINY = 1e-12
# Half-precision parts a float32 matrix is split into for ``times_transpose``, and the scale between them:
# two fp16 parts hold 22 of float32's 24 mantissa bits, three bf16 parts all 24.
_SPLIT = {torch.float16: (2, 2.0**11), torch.bfloat16: (3, 2.0**8)}


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(torch.float32)


def times_transpose(x: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """``x @ d.T`` in float32, for token rows ``x`` and a float32 matrix ``d``.

    Half-precision ``x`` on CUDA (the layer check of a half-precision model): ``d`` is split into
    half-precision parts, ``d ~ p0 + p1 / s + p2 / s^2``, and each part is multiplied on the tensor cores with
    a float32 result. ``x`` is exact in its own dtype, so the product is as accurate as a float32 one
    (relative 2^-22 with fp16's two parts) at a fraction of its time: the float32 products of the layer
    check were 1.1 s of a 7B run on an H200. Elsewhere, or where this torch has no such product (a CPU):
    float32."""
    split = _SPLIT.get(x.dtype)
    if split is not None:
        parts, scale = split
        out, rest, unit = None, _f32(d), 1.0
        for _ in range(parts):
            part = (rest / unit).to(x.dtype)
            product = half_product(x, part.T)
            if product is None:
                break
            out = product * unit if out is None else out.add_(product, alpha=unit)
            rest = rest - part.float() * unit
            unit /= scale
        else:
            return out
    return _f32(x) @ _f32(d).T


def _ratio_scale(num: torch.Tensor, den: torch.Tensor, clamp: tuple[float, float]) -> torch.Tensor:
    """``clamp(sqrt(num / den), lo, hi)``; 1 where the denominator is empty (nothing left to scale)."""
    scale = torch.sqrt(num / den.clamp_min(_TINY))
    scale = scale.where(den > _TINY, torch.ones_like(scale))
    return scale.clamp(clamp[0], clamp[1])


def ec_column_scale(w0: torch.Tensor, w: torch.Tensor, centered: bool, clamp: tuple[float, float]) -> torch.Tensor:
    """Per input column j: ``sqrt(sum_i (w0_ij - mu_j)^2 / sum_i (w_ij - mu_j)^2)``, mu from ``w0``."""
    mu = w0.mean(dim=0, keepdim=True) if centered else torch.zeros_like(w0[:1])
    return _ratio_scale((w0 - mu).square().sum(0), (w - mu).square().sum(0), clamp)


def ec_row_scale(w0: torch.Tensor, w: torch.Tensor, centered: bool, clamp: tuple[float, float]) -> torch.Tensor:
    """Per output row i: the same energy ratio taken along the row, mu from ``w0``."""
    mu = w0.mean(dim=1, keepdim=True) if centered else torch.zeros_like(w0[:, :1])
    return _ratio_scale((w0 - mu).square().sum(1), (w - mu).square().sum(1), clamp)


def energy_compensation(
    w0: torch.Tensor,
    mask: torch.Tensor,
    steps: str = "column,row",
    centered: bool = True,
    clamp: tuple[float, float] = (1.0, 2.0),
) -> torch.Tensor:
    """EC: rescale surviving weights so each column's and/or row's centered energy is restored."""
    w0 = _f32(w0)
    w = w0 * mask
    for step in steps.split(","):
        if step == "column":
            w = mask * (w * ec_column_scale(w0, w, centered, clamp)[None, :])
        elif step == "row":
            w = mask * (w * ec_row_scale(w0, w, centered, clamp)[:, None])
        else:
            raise ValueError(f"unknown EC step {step!r}; use 'column' and/or 'row'")
    return w


def activation_energy_row_scale(
    w0: torch.Tensor, mask: torch.Tensor, second_moment: torch.Tensor, clamp: tuple[float, float]
) -> torch.Tensor:
    """Per row: ``sqrt(sum_j w0_ij^2 m2_j / sum_j M_ij w0_ij^2 m2_j)``, the output energy the row lost."""
    e = _f32(w0).square() * second_moment.to(w0.device, torch.float32)[None, :]
    return _ratio_scale(e.sum(1), (e * mask).sum(1), clamp)


def lsq_row_scale(w0: torch.Tensor, w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per row, the ``s_i`` minimising ``||w0_i X - s_i w_i X||^2`` over token rows ``x`` ``[k, d_in]``."""
    y0 = times_transpose(x, w0)
    y = times_transpose(x, w)
    num = (y0 * y).sum(0)
    den = y.square().sum(0)
    return torch.where(den > _TINY, num / den.clamp_min(_TINY), torch.ones_like(den))


def bias_shift(w0: torch.Tensor, mask: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
    """FLAP-style mean compensation: ``delta b_i = sum_j (1 - M_ij) w0_ij mu_j``."""
    return (_f32(w0) * (~mask)) @ mean.to(w0.device, torch.float32)


def output_error(
    w0: torch.Tensor,
    w: torch.Tensor,
    x: torch.Tensor,
    bias_delta: torch.Tensor | None = None,
) -> float:
    """``||X w0^T - (X w^T + delta_b)||^2`` summed over the token rows ``x``."""
    diff = times_transpose(x, _f32(w0) - _f32(w))
    if bias_delta is not None:
        diff = diff - bias_delta[None, :]
    return float(diff.square().sum())


def row_scaled_errors(
    weight: torch.Tensor, mask: torch.Tensor, scale: torch.Tensor, x: torch.Tensor
) -> tuple[float, float] | None:
    """``output_error`` of the pruned weight and of the pruned weight with its rows times ``scale``, from two
    tensor-core products instead of two split ones, or None where that does not apply.

    When ``x`` and ``weight`` share a half-precision dtype, the weight's pruned part and its kept part are
    exact in it, and ``w0 - s * pruned = dropped + (1 - s) * kept``: the errors come from ``x @ dropped.T``
    and ``x @ kept.T`` with float32 results (no split, no float32 copies of the weight)."""
    if x.dtype not in _SPLIT or weight.dtype != x.dtype:
        return None
    dropped = half_product(x, (weight * ~mask).T)
    if dropped is None:
        return None
    kept = half_product(x, (weight * mask).T)
    err_none = dropped.square().sum()
    err_comp = dropped.add_(kept * (1 - scale.to(torch.float32))[None, :]).square().sum()
    return float(err_none), float(err_comp)


@dataclass
class Compensated:
    """A layer's final weight, an optional bias shift, and the record the manifest keeps."""

    weight: torch.Tensor
    bias_delta: torch.Tensor | None = None
    record: dict[str, Any] = field(default_factory=dict)


def compensate(
    w0: torch.Tensor,
    mask: torch.Tensor,
    kind: str,
    stats: ChannelStats | None = None,
    *,
    has_bias: bool = True,
    add_bias: bool = False,
    ec_steps: str = "column,row",
    ec_centered: bool = True,
    ec_clamp: tuple[float, float] = (1.0, 2.0),
    shrink: float = 1.0,
    safety_check: bool = False,
    model_weight: torch.Tensor | None = None,
) -> Compensated:
    """Apply compensation ``kind`` to the masked weight, moved ``shrink`` of the way from the pruned
    weight; with ``safety_check``, keep it only if it lowers the output error on the token subsample, and
    record both errors either way when a subsample exists.

    The least-squares scale is fitted on the even rows of the subsample and judged on the odd ones: judged
    on the rows it was fitted to, it can only look better, and the check would never say no.

    ``model_weight`` is ``w0`` as the model holds it (default ``w0`` itself): with half-precision token rows
    of its dtype, the errors of the row scales (``ec-activation``, ``lsq``) come from ``row_scaled_errors``."""
    original = (model_weight if model_weight is not None else w0).detach()
    w0 = _f32(w0)
    pruned = w0 * mask
    record: dict[str, Any] = {"kind": kind}
    if kind == "none":
        return Compensated(pruned, None, {"kind": "none", "applied": False})

    bias_delta = None
    row_scale = None  # the compensation multiplies each row of the pruned weight by this
    sample = stats.sample.to(w0.device) if stats is not None and stats.sample is not None else None
    judge = sample
    if kind == "ec":
        weight = energy_compensation(w0, mask, ec_steps, ec_centered, ec_clamp)
    elif kind == "ec-activation":
        row_scale = activation_energy_row_scale(w0, mask, _need(stats, kind).second_moment, ec_clamp)
        weight = pruned * row_scale[:, None]
    elif kind == "lsq":
        if _need(stats, kind).sample is None:
            raise ValueError("lsq compensation needs a token subsample (sample_tokens > 0)")
        fit, judge = (sample[0::2], sample[1::2]) if sample.shape[0] > 1 else (sample, sample)
        row_scale = lsq_row_scale(w0, pruned, fit)
        weight = pruned * row_scale[:, None]
    elif kind == "bias":
        if not (has_bias or add_bias):
            return Compensated(pruned, None, {"kind": kind, "applied": False, "reason": "layer has no bias (add_bias is off)"})
        weight = pruned
        bias_delta = bias_shift(w0, mask, _need(stats, kind).mean)
    else:
        raise ValueError(f"unknown compensation {kind!r}")
    if shrink != 1.0:
        weight = pruned + shrink * (weight - pruned)
        bias_delta = bias_delta * shrink if bias_delta is not None else None
        row_scale = 1 + shrink * (row_scale - 1) if row_scale is not None else None
    weight = weight * mask

    applied = True
    if judge is not None:
        errors = row_scaled_errors(original, mask, row_scale, judge) if row_scale is not None else None
        if errors is None:
            errors = output_error(w0, pruned, judge), output_error(w0, weight, judge, bias_delta)
        err_none, err_comp = errors
        record.update(error_none=err_none, error_compensated=err_comp)
        if safety_check:
            applied = err_comp < err_none
    elif safety_check:
        raise ValueError("the safety check needs a token subsample (sample_tokens > 0)")
    record["applied"] = applied
    if not applied:
        return Compensated(pruned, None, record)
    return Compensated(weight, bias_delta, record)


def _need(stats: ChannelStats | None, kind: str) -> ChannelStats:
    if stats is None:
        raise ValueError(f"{kind} compensation needs activation statistics")
    return stats

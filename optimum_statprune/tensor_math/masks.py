"""Masks from scores: unstructured per output row or per layer, and N:M along the input dimension.

A mask is a bool tensor shaped like the weight, True = kept. Counts are exact: a group of ``n``
weights at sparsity ``s`` prunes ``floor(s * n)`` of them (so 50% of a row of width 5 prunes 2).
Ties break deterministically: among equal scores the lower index is pruned first (stable sort).
"""

from __future__ import annotations

import math

import torch

from .patterns import check_nm, check_nm_width, check_sparsity, parse_pattern


def prune_count(n: int, sparsity: float) -> int:
    """Weights pruned in a group of ``n`` at ``sparsity``: ``floor(sparsity * n)``, robust to float error."""
    return min(n, int(math.floor(sparsity * n + 1e-9)))


def _prune_lowest(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Mask over the last dim of ``scores`` that drops the ``k`` lowest entries of every row."""
    mask = torch.ones_like(scores, dtype=torch.bool)
    if k == 0:
        return mask
    order = torch.sort(scores, dim=-1, stable=True).indices[..., :k]
    return mask.scatter_(-1, order, False)


def unstructured_mask(scores: torch.Tensor, sparsity: float, group: str = "row") -> torch.Tensor:
    """Keep the highest scores: ``floor(sparsity * d_in)`` pruned per row, or ``floor(sparsity * numel)``
    per layer."""
    check_sparsity(sparsity, closed=True)
    scores = _finite(scores)
    if group == "row":
        return _prune_lowest(scores, prune_count(scores.shape[-1], sparsity))
    if group == "layer":
        flat = scores.reshape(1, -1)
        return _prune_lowest(flat, prune_count(flat.shape[-1], sparsity)).reshape(scores.shape)
    raise ValueError(f"group must be 'row' or 'layer', got {group!r}")


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the ``n`` highest of every ``m`` consecutive inputs of each row."""
    check_nm(n, m)
    d_out, d_in = scores.shape
    check_nm_width(d_in, n, m)
    groups = _finite(scores).reshape(d_out, d_in // m, m)
    return _prune_lowest(groups, m - n).reshape(d_out, d_in)


def make_mask(scores: torch.Tensor, sparsity: float, pattern: str = "unstructured", group: str = "row") -> torch.Tensor:
    """Dispatch on ``pattern``: ``"unstructured"`` or ``"N:M"`` (``sparsity`` is then implied)."""
    nm = parse_pattern(pattern)
    if nm is None:
        return unstructured_mask(scores, sparsity, group)
    return nm_mask(scores, *nm)


def _finite(scores: torch.Tensor) -> torch.Tensor:
    """NaN scores (e.g. from a channel that saw only zeros) rank lowest rather than at random.

    float64 scores stay float64 (casting them to float32 could turn distinct scores into ties);
    other floating dtypes are compared in float32, integers in float64."""
    if scores.dtype != torch.float64:
        scores = scores.to(torch.float32 if scores.is_floating_point() else torch.float64)
    return torch.nan_to_num(scores, nan=-math.inf)

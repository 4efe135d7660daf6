"""Importance scores: pure functions of a weight ``[d_out, d_in]``, its input statistics and parameters.

Higher score = more important = kept. Scores are computed in float32 whatever the weight's dtype.
"""

from __future__ import annotations

import torch

from .stats import ChannelStats


def _abs32(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().to(torch.float32).abs()


def magnitude_score(weight: torch.Tensor) -> torch.Tensor:
    """``|W|``."""
    return _abs32(weight)


def wanda_score(weight: torch.Tensor, stats: ChannelStats) -> torch.Tensor:
    """Wanda: ``|W_ij| * ||X_j||_2``."""
    return _abs32(weight) * stats.norm.to(weight.device, torch.float32)[None, :]


def ria_score(weight: torch.Tensor, stats: ChannelStats, power: float = 0.5) -> torch.Tensor:
    """RIA: ``(|W_ij| / sum_j |W_ij| + |W_ij| / sum_i |W_ij|) * ||X_j||_2 ** power``."""
    w = _abs32(weight)
    row = w.sum(dim=1, keepdim=True)
    col = w.sum(dim=0, keepdim=True)
    relative = w / row.where(row > 0, torch.ones_like(row)) + w / col.where(col > 0, torch.ones_like(col))
    return relative * stats.norm.pow(power).to(weight.device, torch.float32)[None, :]


def weight_dispersion(weight: torch.Tensor, axis: str = "column") -> torch.Tensor:
    """Population variance of the weights per input column (``[d_in]``) or per output row (``[d_out]``)."""
    w = weight.detach().to(torch.float32)
    if axis == "column":
        return w.var(dim=0, unbiased=False)
    if axis == "row":
        return w.var(dim=1, unbiased=False)
    raise ValueError(f"weight_stat_axis must be 'column' or 'row', got {axis!r}")


def cvr_score(
    weight: torch.Tensor,
    stats: ChannelStats,
    alpha: float = 1.0,
    eps: float = 1e-8,
    axis: str = "column",
    activation_stat: str = "variance",
    activation_power: float = 0.5,
) -> torch.Tensor:
    """CVR: ``|W_ij| * A_j^(p/2) * (sigma^2_W + eps)^(-alpha/2)`` with ``A = Var(x)`` (or the second
    moment ``E[x^2]``) and ``p = activation_power``; the paper's formula is ``Var(x)^(1/4)``.

    The activation term damps outlier channels relative to Wanda's norm; the dispersion term measures
    each weight in units of its group's spread (column j, or row i with ``axis="row"``). With
    ``A = E[x^2]``, ``p = 1`` and ``alpha = 0`` the score ranks like Wanda's, so the parameters span the
    path between the two.
    """
    w = _abs32(weight)
    if activation_stat == "variance":
        a = stats.variance
    elif activation_stat == "second_moment":
        a = stats.second_moment
    else:
        raise ValueError(f"activation_stat must be 'variance' or 'second_moment', got {activation_stat!r}")
    act = a.pow(activation_power / 2).to(weight.device, torch.float32)[None, :]
    disp = (weight_dispersion(weight, axis) + eps).pow(-alpha / 2)
    disp = disp[None, :] if axis == "column" else disp[:, None]
    return w * act * disp

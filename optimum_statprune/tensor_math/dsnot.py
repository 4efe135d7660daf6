"""DSnoT-style mask refinement: swap pruned and kept weights using channel means and variances only.

A cheap tier between "mask only" and the ADMM update (``weight_update.py``): no Gram matrix, no weight
change, only first-order channel statistics (the ``ChannelStats`` the mask methods already gather).
After Zhang et al. 2023 ("Dynamic Sparse No Training", arXiv 2310.08915), simplified to one objective.

For output row ``i`` the error of pruning the set ``P`` is ``e_i = sum_{j in P} W_ij x_j``. Treating the
input channels as uncorrelated, its expected square is

    E[e_i^2] = r_i^2 + v_i,   r_i = sum_{j in P} W_ij mu_j,   v_i = sum_{j in P} W_ij^2 Var(x_j)

(the ``a_j^2 + b_j`` part is Wanda's score squared, up to the mean/variance split; what the mask
methods miss is the cross term ``2 r_i a_j``: pruned weights whose mean contributions add up). Each
step, every row takes its best single swap (revive ``g`` in ``P``, prune ``p`` not in ``P``) if it
lowers that objective, with the exact change

    delta = (r - a_g + a_p)^2 - r^2 - b_g + b_p,   a_j = W_ij mu_j,  b_j = W_ij^2 Var(x_j)

Unstructured rows choose ``g`` first (largest drop alone), then the best ``p`` given ``g``. N:M rows
evaluate every (pruned, kept) pair inside each group of ``M`` and take the best over the row, so every
swap stays inside a group: counts per row and per group are unchanged by construction.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class RefineResult:
    mask: torch.Tensor
    """bool ``[d_out, d_in]``, True = kept; same counts per row (and per N:M group) as the input mask."""
    swaps: int
    """Swaps made over all rows."""
    objective_before: float
    objective_after: float
    """``sum_i r_i^2 + v_i`` before and after."""


def expected_error(weight: torch.Tensor, mask: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """Per row ``r_i^2 + v_i``: the expected squared output error of pruning ``~mask`` (channels uncorrelated)."""
    w = weight.to(torch.float32) * (~mask)
    r = w @ mean.to(w.device, torch.float32)
    v = w.square() @ var.to(w.device, torch.float32)
    return r.square() + v


@torch.no_grad()
def refine_mask(
    weight: torch.Tensor,
    mask: torch.Tensor,
    mean: torch.Tensor,
    var: torch.Tensor,
    *,
    pattern: str = "unstructured",
    max_swaps: int = 64,
    tol: float = 0.0,
) -> RefineResult:
    """Greedy swaps on ``mask`` (True = kept) that lower every row's ``r^2 + v``; at most ``max_swaps`` per row.

    ``mean``/``var`` are the per-input-channel mean and variance of the calibration inputs
    (``ChannelStats.mean``/``.variance``). ``pattern`` "unstructured" (swaps anywhere in a row) or "N:M"
    (swaps inside a group). A row stops when its best swap does not lower its objective by more than
    ``tol`` times its current value. Returns a new mask; ``weight`` is not changed.
    """
    w = weight.detach().to(torch.float32)
    keep = mask.to(device=w.device, dtype=torch.bool).clone()
    d_out, d_in = w.shape
    a = w * mean.to(w.device, torch.float32)[None, :]
    b = w.square() * var.to(w.device, torch.float32).clamp_min(0)[None, :]
    pruned = ~keep
    r = (a * pruned).sum(1)
    obj0 = r.square() + (b * pruned).sum(1)
    active = torch.ones(d_out, dtype=torch.bool, device=w.device)
    rows = torch.arange(d_out, device=w.device)
    swaps = 0
    nm = None if pattern == "unstructured" else tuple(int(v) for v in pattern.split(":"))
    inf = torch.tensor(float("inf"), device=w.device)
    for _ in range(max_swaps):
        if not bool(active.any()):
            break
        pruned = ~keep
        rr = r[:, None]
        if nm is None:
            # revive g alone: change (r - a_g)^2 - r^2 - b_g; then prune p given g: (r' + a_p)^2 - r'^2 + b_p
            grow = torch.where(pruned, (rr - a).square() - rr.square() - b, inf)
            g = grow.argmin(1)
            r1 = r - a[rows, g]
            cost = torch.where(keep, (r1[:, None] + a).square() - r1[:, None].square() + b, inf)
            p = cost.argmin(1)
            delta = grow[rows, g] + cost[rows, p]
        else:
            n, m = nm
            ag = a.reshape(d_out, d_in // m, m)
            bg = b.reshape(d_out, d_in // m, m)
            kg = keep.reshape(d_out, d_in // m, m)
            r3 = r[:, None, None, None]
            # pairs (g revived, p pruned) inside a group: [rows, groups, m (g), m (p)]
            new_r = r3 - ag[..., :, None] + ag[..., None, :]
            d = new_r.square() - r3.square() - bg[..., :, None] + bg[..., None, :]
            ok = (~kg)[..., :, None] & kg[..., None, :]
            d = torch.where(ok, d, inf).reshape(d_out, -1)
            best = d.argmin(1)
            delta = d[rows, best]
            group, rest = best // (m * m), best % (m * m)
            g, p = group * m + rest // m, group * m + rest % m
        obj = r.square() + (b * pruned).sum(1)
        take = active & torch.isfinite(delta) & (delta < -tol * obj)
        if not bool(take.any()):
            break
        idx = rows[take]
        keep[idx, g[take]] = True
        keep[idx, p[take]] = False
        r = r + torch.where(take, a[rows, p] - a[rows, g], torch.zeros_like(r))
        swaps += int(take.sum())
        active = take
    obj1 = r.square() + (b * ~keep).sum(1)
    return RefineResult(mask=keep, swaps=swaps, objective_before=float(obj0.sum()), objective_after=float(obj1.sum()))

"""OWL: Outlier Weighed Layerwise sparsity (Yin et al., 2023), with exact pruned counts.

OWL gives decoder blocks that hold more *outlier* Wanda scores (``|W| * ||X_j||`` above ``M`` times
the block's mean score) less sparsity, within ``[target - lam, target + lam]``, with mean ``target``.

Three steps:

1. ``outlier_ratio``: the fraction of a block's scores above ``M`` times their mean (one mean over all
   linears of the block, as the reference concatenates them).
2. ``owl_sparsities``: continuous per-block sparsities whose mean, weighted by the number of prunable
   weights per block, is the target.
3. ``owl_prune_counts``: integer per-row (or per-layer) prune counts that realise step 2 exactly.

What "exact" means here. The engine prunes ``floor(s * d_in)`` weights in each row of a linear
(``group="row"``) or ``floor(s * d_out * d_in)`` per linear (``group="layer"``). With such counts the total
can move only in steps of ``d_out``, so ``floor(target * total)`` is in general unreachable (it is not
even what *uniform* sparsity prunes when ``target * d_in`` is fractional), and a single float per
block cannot hit a prescribed total either, because a block's count jumps by different amounts as
its sparsity crosses the breakpoints of its different input widths. So the promise is:

    OWL prunes exactly as many weights in total as uniform sparsity at ``target`` would under the same
    counting rule, i.e. ``sum over linears of d_out * floor(target * d_in)`` (row groups) or
    ``sum of floor(target * numel)`` (layer groups).

That equals ``floor(target * total)`` whenever ``target * d_in`` (``target * numel``) is an integer for
every linear, e.g. 50% of even widths. OWL then only *redistributes* pruning, so OWL and uniform runs
are compared at identical sparsity. It is realised by giving each linear its own integer count, a
rounding of ``s_b * d_in`` (less than two weights per row away from it, usually less than one, unless
clamping to ``[0, d_in]`` or inconsistent inputs force more), chosen by an apportionment that keeps
the total of every group of interchangeable units (same weight per count step: same ``d_out`` for
rows, any linear for layers) equal to its uniform total. ``count_sparsity`` turns a count back into
the float to pass to ``masks.make_mask``, verified against ``masks.prune_count``.
"""

from __future__ import annotations

import heapq
import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .masks import prune_count
from .patterns import check_sparsity

# Sparsities are clamped into [_EDGE, 1 - _EDGE]: OWL never empties or leaves untouched a whole block.
_EDGE = 1e-3
_BISECT_STEPS = 200

Shape = tuple[int, int]  # (d_out, d_in) of one prunable linear


def _check_target(target: float) -> None:
    check_sparsity(target, "OWL target sparsity", _EDGE, 1 - _EDGE, closed=True)


def _check_lam(lam: float) -> None:
    if not (isinstance(lam, numbers.Real) and math.isfinite(lam) and 0 <= lam < 1):
        raise ValueError(
            f"OWL lambda (the sparsity spread around the target) must lie in [0, 1), got {lam!r}"
        )


# --------------------------------------------------------------------------- step 1: outlier ratio


@torch.no_grad()
def outlier_ratio(scores: torch.Tensor | Sequence[torch.Tensor], M: float) -> float:
    """Fraction of entries greater than ``M`` times the mean entry.

    Pass the Wanda scores of one linear, or a sequence of them (all linears of a block): the mean is
    then taken over all their entries together, as the reference does by concatenating the block's
    scores, without building the concatenation. A fraction in [0, 1], not the reference's percent;
    only the relative values matter to ``owl_sparsities``."""
    if not (isinstance(M, numbers.Real) and math.isfinite(M) and M > 0):
        raise ValueError(
            f"OWL outlier threshold M must be a positive finite multiple of the mean score, got {M!r}"
        )
    parts = [scores] if isinstance(scores, torch.Tensor) else list(scores)
    numel = sum(p.numel() for p in parts)
    if numel == 0:
        raise ValueError("outlier_ratio needs at least one score")
    total = sum(float(p.detach().to(torch.float64).sum()) for p in parts)
    mean = total / numel
    if not math.isfinite(mean):
        raise ValueError("scores contain NaN or infinite values")
    threshold = M * mean
    count = sum(int((p.detach().to(torch.float64) > threshold).sum()) for p in parts)
    return count / numel


# --------------------------------------------------------------------------- step 2: sparsities


def _weighted_mean(values: torch.Tensor, weights: torch.Tensor) -> float:
    return float((values * weights).sum() / weights.sum())


def _recenter(base: torch.Tensor, weights: torch.Tensor, target: float) -> torch.Tensor:
    """``clamp(base + c, EDGE, 1 - EDGE)`` with the shift ``c`` that makes the weighted mean ``target``.

    A monotone shift keeps the order of the blocks, and it stays inside the range of ``base`` and the
    clamp (see ``owl_sparsities``). Bisection: the mean is monotone and continuous in ``c``."""
    if bool(((base >= _EDGE) & (base <= 1 - _EDGE)).all()):
        return base  # nothing to clamp: the mean is already the target
    lo, hi = -3.0, 3.0  # base lies within target +/- 2 lam, lam < 1: these shifts clamp everything
    for _ in range(_BISECT_STEPS):
        mid = (lo + hi) / 2
        if mid in (lo, hi):
            break
        if _weighted_mean((base + mid).clamp(_EDGE, 1 - _EDGE), weights) < target:
            lo = mid
        else:
            hi = mid
    return (base + (lo + hi) / 2).clamp(_EDGE, 1 - _EDGE)


def owl_sparsities(
    ratios: Sequence[float],
    block_sizes: Sequence[int],
    target: float,
    lam: float,
    *,
    mapping: str = "centered",
) -> list[float]:
    """Per-block sparsities: higher outlier ratio -> lower sparsity; weighted mean == ``target``.

    ``block_sizes`` (prunable weights per block) weight the mean. ``mapping``:

    - ``"centered"`` (default): ``s_b = target - lam * (r_b - r_mean) / max_b |r_b - r_mean|`` with
      ``r_mean`` the weighted mean ratio. Linear in the ratios like the reference, and it honours both
      constraints the OWL paper states: every ``s_b`` in ``[target - lam, target + lam]`` and mean
      ``target``; the block furthest from the mean sits at ``target -/+ lam``.
    - ``"original"``: the reference code's map of the ratios onto ``[0, 2 lam]`` then shift to the mean.
      Its spread is exactly ``2 lam`` but, for skewed ratios, it leaves ``[target - lam, target + lam]``
      (up to ``target +/- 2 lam``). Use it to reproduce published OWL numbers.

    Both coincide when the ratios are symmetric about their mean (e.g. two blocks). Sparsities are
    then clamped into ``[0.001, 0.999]`` and shifted together so that the weighted mean stays exactly
    ``target`` (to float precision); the shift never pushes a block out of ``[target - lam, target + lam]``.
    All ratios equal (or one block, or ``lam == 0``) gives ``target`` everywhere.
    """
    _check_target(target)
    _check_lam(lam)
    if mapping not in ("centered", "original"):
        raise ValueError(f"mapping must be 'centered' or 'original', got {mapping!r}")
    if len(ratios) != len(block_sizes) or not ratios:
        raise ValueError(
            f"need one ratio per block and at least one block; got {len(ratios)} ratios, {len(block_sizes)} sizes"
        )
    r = torch.tensor([float(x) for x in ratios], dtype=torch.float64)
    w = torch.tensor([float(x) for x in block_sizes], dtype=torch.float64)
    if not bool(torch.isfinite(r).all()) or bool((r < 0).any()):
        raise ValueError(f"outlier ratios must be finite and non-negative, got {list(ratios)}")
    if not bool(torch.isfinite(w).all()) or bool((w <= 0).any()):
        raise ValueError(f"block sizes must be positive weight counts, got {list(block_sizes)}")

    spread = float(r.max() - r.min())
    if lam == 0 or spread == 0:
        return [float(target)] * len(r)
    if mapping == "centered":
        dev = r - _weighted_mean(r, w)
        base = target - lam * dev / float(dev.abs().max())
    else:
        norm = (r - r.min()) / spread * (2 * lam)
        base = target + _weighted_mean(norm, w) - norm
    return [float(x) for x in _recenter(base, w, target)]


# --------------------------------------------------------------------------- step 3: exact counts


def count_sparsity(count: int, n: int) -> float:
    """The sparsity ``s`` for which ``masks.prune_count(n, s) == count``.

    ``count / n`` is not always it: for ``n`` ~ 1e7 or more the product ``(count / n) * n`` can fall one
    ulp below ``count``, beyond ``prune_count``'s 1e-9 guard, so the float is nudged until it agrees."""
    if not 0 <= count <= n:
        raise ValueError(f"cannot prune {count} of {n} weights")
    if n == 0:
        return 0.0
    s = count / n
    while prune_count(n, s) < count:
        s = math.nextafter(s, math.inf)
    while prune_count(n, s) > count:
        s = math.nextafter(s, -math.inf)
    return s


def _apportion(desired: list[float], caps: list[int], total: int, rank: list[float] | None = None) -> list[int]:
    """Integers ``k_u`` in ``[0, caps_u]`` summing to ``total``, as close as possible to ``desired``.

    Greedy on increments: unit ``u``'s ``j``-th unit of count costs ``j - desired_u``, and the ``total``
    cheapest increments are taken (ties: higher ``rank`` first, e.g. the block's sparsity, so a sparser
    block never ends with fewer; then lower unit index), which is largest-remainder rounding when
    ``total`` is within one per unit of ``sum(desired)``. A bisection on a common offset takes care of the
    bulk first, so a far-off ``total`` costs no more than a near one."""
    rank = rank if rank is not None else desired
    if not 0 <= total <= sum(caps):
        raise ValueError(f"cannot spread {total} pruned weights over units of capacities {caps}")
    x = torch.tensor(desired, dtype=torch.float64)
    cap = torch.tensor(caps, dtype=torch.float64)

    def at(offset: float) -> torch.Tensor:
        return torch.minimum(torch.floor(x + offset).clamp_min(0.0), cap)

    lo, hi = -float(x.max()) - 1.0, float(cap.max()) + 1.0  # at(lo) sums to 0 <= total; at(hi) to sum(caps)
    for _ in range(_BISECT_STEPS):
        mid = (lo + hi) / 2
        if mid in (lo, hi):
            break
        if float(at(mid).sum()) <= total:
            lo = mid
        else:
            hi = mid
    counts = [int(v) for v in at(lo).tolist()]
    heap = [(counts[u] + 1 - desired[u], -rank[u], u) for u in range(len(counts)) if counts[u] < caps[u]]
    heapq.heapify(heap)
    for _ in range(total - sum(counts)):
        *_, u = heapq.heappop(heap)
        counts[u] += 1
        if counts[u] < caps[u]:
            heapq.heappush(heap, (counts[u] + 1 - desired[u], -rank[u], u))
    return counts


def owl_prune_counts(
    sparsities: Sequence[float],
    shapes: Sequence[Sequence[Shape]],
    target: float,
    group: str = "row",
) -> list[list[int]]:
    """Integer prune counts per block and linear that realise ``sparsities`` with the exact uniform total.

    ``shapes[b]`` lists the ``(d_out, d_in)`` of block ``b``'s prunable linears. Returns ``counts[b][l]``:
    weights pruned in *each row* of that linear (``group="row"``) or in the whole linear
    (``group="layer"``), each a rounding of ``sparsities[b] * d_in`` (resp. ``* numel``), such that

        sum_b sum_l d_out * counts[b][l]  ==  sum_b sum_l d_out * floor(target * d_in)   (row)
        sum_b sum_l counts[b][l]          ==  sum_b sum_l floor(target * d_out * d_in)   (layer)

    (floors as ``masks.prune_count``). Units with the same ``d_out`` (row) are interchangeable for the
    total, so each such group is apportioned separately to its own uniform total; for layer groups all
    linears form one group.
    """
    _check_target(target)
    if group not in ("row", "layer"):
        raise ValueError(f"group must be 'row' or 'layer', got {group!r}")
    if len(sparsities) != len(shapes):
        raise ValueError(
            f"need one sparsity per block: {len(sparsities)} sparsities for {len(shapes)} blocks"
        )
    units: dict[int, list[tuple[int, int, float, int]]] = {}  # step weight -> [(block, linear, desired, cap)]
    for b, (s, block) in enumerate(zip(sparsities, shapes, strict=True)):
        check_sparsity(s, f"block {b}: sparsity", closed=True)
        for li, (d_out, d_in) in enumerate(block):
            if d_out <= 0 or d_in <= 0:
                raise ValueError(f"block {b}, linear {li}: invalid shape ({d_out}, {d_in})")
            step, cap = (d_out, d_in) if group == "row" else (1, d_out * d_in)
            units.setdefault(step, []).append((b, li, s * cap, cap))

    counts: list[list[int]] = [[0] * len(block) for block in shapes]
    for members in units.values():
        caps = [cap for *_, cap in members]
        uniform = sum(prune_count(cap, target) for cap in caps)
        rank = [sparsities[b] for b, *_ in members]  # equal costs: the sparser block first
        for (b, li, _, _), k in zip(
            members, _apportion([d for _, _, d, _ in members], caps, uniform, rank), strict=True
        ):
            counts[b][li] = k
    return counts


@dataclass
class OWLAllocation:
    """Everything the engine needs from OWL, and what the manifest should record."""

    ratios: list[float]
    """Outlier ratio per block, as given."""
    block_sparsity: list[float]
    """Continuous OWL sparsity per block (``owl_sparsities``)."""
    counts: list[list[int]]
    """Per block and linear: pruned weights per row (``group="row"``) or per linear (``"layer"``)."""
    sparsity: list[list[float]]
    """Per block and linear: the float to pass to ``masks.make_mask`` that reproduces ``counts``."""
    pruned: int
    """Total pruned weights; equals ``uniform_pruned``."""
    uniform_pruned: int
    """What uniform sparsity at the target prunes under the same counting rule."""
    total: int
    """All prunable weights."""


def owl_allocate(
    ratios: Sequence[float],
    shapes: Sequence[Sequence[Shape]],
    target: float,
    lam: float,
    group: str = "row",
    mapping: str = "centered",
) -> OWLAllocation:
    """``owl_sparsities`` then ``owl_prune_counts``, for blocks whose linears have ``shapes[b]``."""
    if any(not block for block in shapes):
        raise ValueError("every block needs at least one prunable linear")
    sizes = [sum(o * i for o, i in block) for block in shapes]
    block_sparsity = owl_sparsities(ratios, sizes, target, lam, mapping=mapping)
    counts = owl_prune_counts(block_sparsity, shapes, target, group)
    sparsity, pruned, uniform = [], 0, 0
    for block, block_counts in zip(shapes, counts, strict=True):
        row = []
        for (d_out, d_in), k in zip(block, block_counts, strict=True):
            n, weight = (d_in, d_out) if group == "row" else (d_out * d_in, 1)
            row.append(count_sparsity(k, n))
            pruned += weight * k
            uniform += weight * prune_count(n, target)
        sparsity.append(row)
    return OWLAllocation(
        ratios=[float(r) for r in ratios],
        block_sparsity=block_sparsity,
        counts=counts,
        sparsity=sparsity,
        pruned=pruned,
        uniform_pruned=uniform,
        total=sum(sizes),
    )

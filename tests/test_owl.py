"""OWL: outlier ratios, per-block sparsities (monotone, within target +/- lam, exact weighted mean) and
integer prune counts whose total equals uniform pruning's, exactly."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from optimum_statprune.tensor_math.masks import make_mask, prune_count
from optimum_statprune.tensor_math.owl import (
    count_sparsity,
    outlier_ratio,
    owl_allocate,
    owl_prune_counts,
    owl_sparsities,
)

FAST = settings(max_examples=60, deadline=None)

ratio_lists = st.lists(st.floats(0, 0.2, allow_nan=False), min_size=1, max_size=12)
targets = st.integers(10, 90).map(lambda p: p / 100)
lams = st.integers(0, 20).map(lambda p: p / 100)


def _wmean(values, weights) -> float:
    return sum(v * w for v, w in zip(values, weights, strict=True)) / sum(weights)


# Llama-like block: q, k, v, o, gate, up, down (hidden 24, kv 8, intermediate 40)
LLAMA = [(24, 24), (8, 24), (8, 24), (24, 24), (40, 24), (40, 24), (24, 40)]


# --------------------------------------------------------------------------- outlier_ratio


def test_outlier_ratio_counts_entries_above_m_times_mean():
    scores = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 31.0])  # mean 4
    assert outlier_ratio(scores, 5) == pytest.approx(0.1)  # 31 > 20
    assert outlier_ratio(scores, 7.75) == 0.0  # strictly greater: 31 is not > 31
    assert outlier_ratio(scores, 0.2) == 1.0


def test_outlier_ratio_of_a_block_uses_one_mean_over_all_linears():
    """As the reference, which concatenates the block's scores before taking the mean."""
    g = torch.Generator().manual_seed(0)
    parts = [
        torch.rand(3, 5, generator=g) ** 4,
        torch.rand(7, 2, generator=g) * 3,
        torch.rand(4, 4, generator=g),
    ]
    concatenated = torch.cat([p.flatten() for p in parts])
    assert outlier_ratio(parts, 2.0) == outlier_ratio(concatenated, 2.0)
    per_part = sum(outlier_ratio(p, 2.0) * p.numel() for p in parts) / concatenated.numel()
    assert per_part != outlier_ratio(parts, 2.0)  # separate means would give another number


@pytest.mark.parametrize("bad", [0, -1.0, float("nan"), float("inf")])
def test_outlier_ratio_rejects_invalid_m(bad):
    with pytest.raises(ValueError, match="M must be"):
        outlier_ratio(torch.rand(4), bad)


def test_outlier_ratio_rejects_empty_and_nan_scores():
    with pytest.raises(ValueError, match="at least one"):
        outlier_ratio(torch.empty(0), 5)
    with pytest.raises(ValueError, match="NaN"):
        outlier_ratio(torch.tensor([1.0, float("nan")]), 5)


# --------------------------------------------------------------------------- owl_sparsities


@given(
    ratios=ratio_lists,
    data=st.data(),
    target=targets,
    lam=lams,
    mapping=st.sampled_from(["centered", "original"]),
)
@FAST
def test_sparsities_monotone_with_exact_weighted_mean(ratios, data, target, lam, mapping):
    sizes = data.draw(st.lists(st.integers(1, 10_000), min_size=len(ratios), max_size=len(ratios)))
    s = owl_sparsities(ratios, sizes, target, lam, mapping=mapping)
    assert len(s) == len(ratios)
    assert _wmean(s, sizes) == pytest.approx(target, abs=1e-12)
    assert all(1e-3 <= v <= 1 - 1e-3 for v in s)
    for a in range(len(s)):
        for b in range(len(s)):
            if ratios[a] > ratios[b]:
                assert s[a] <= s[b]  # more outliers, less sparsity
    if mapping == "centered":
        assert all(target - lam - 1e-12 <= v <= target + lam + 1e-12 for v in s)
    assert owl_sparsities(ratios, sizes, target, lam, mapping=mapping) == s  # deterministic


def test_centered_mapping_hits_the_range_edge_and_orders_strictly():
    s = owl_sparsities([0.01, 0.02, 0.10], [1, 1, 1], 0.5, 0.08)
    assert s[0] > s[1] > s[2]
    assert s[2] == pytest.approx(0.5 - 0.08)  # the block furthest from the mean sits at the edge
    assert sum(s) / 3 == pytest.approx(0.5)


def test_original_mapping_reproduces_reference_code():
    """Reference: norm = (r - min) / (max - min) * 2 lam; density = norm - mean(norm) + (1 - target)."""
    ratios, target, lam = [0.01, 0.02, 0.10], 0.6, 0.08
    norm = [(r - 0.01) / 0.09 * 2 * lam for r in ratios]
    expected = [1 - (n - sum(norm) / 3 + 1 - target) for n in norm]
    got = owl_sparsities(ratios, [5, 5, 5], target, lam, mapping="original")
    assert got == pytest.approx(expected, abs=1e-12)
    assert max(got) - min(got) == pytest.approx(2 * lam)
    assert min(got) < target - lam  # skewed ratios leave target +/- lam: why "centered" is the default


def test_two_blocks_mappings_agree():
    a = owl_sparsities([0.3, 0.1], [2, 2], 0.5, 0.05)
    b = owl_sparsities([0.3, 0.1], [2, 2], 0.5, 0.05, mapping="original")
    assert a == pytest.approx([0.45, 0.55])
    assert b == pytest.approx([0.45, 0.55])


def test_block_sizes_weight_the_mean():
    s = owl_sparsities([0.0, 1.0], [3, 1], 0.5, 0.1)
    assert 3 * s[0] + s[1] == pytest.approx(2.0)
    assert s[1] == pytest.approx(0.4)  # |dev| of the small block is largest: it sits at the edge


@pytest.mark.parametrize("ratios", [[0.07] * 5, [0.0] * 3, [0.3]])
def test_equal_ratios_or_one_block_give_uniform_target(ratios):
    assert owl_sparsities(ratios, [10] * len(ratios), 0.7, 0.08) == [0.7] * len(ratios)


def test_lam_zero_is_uniform():
    assert owl_sparsities([0.1, 0.5, 0.2], [1, 2, 3], 0.4, 0.0) == [0.4] * 3


def test_clamping_keeps_mean_and_range():
    """target 0.05 with lam 0.2 would ask for negative sparsities: clamp and re-centre."""
    ratios, sizes = [0.0, 0.01, 0.02, 0.5], [4, 4, 4, 4]
    s = owl_sparsities(ratios, sizes, 0.05, 0.2)
    assert min(s) == 1e-3 and s[0] >= s[1] >= s[2] >= s[3]
    assert _wmean(s, sizes) == pytest.approx(0.05, abs=1e-12)
    assert max(s) <= 0.05 + 0.2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"target": 0.0}, "target"),
        ({"target": 1.0}, "target"),
        ({"target": float("nan")}, "target"),
        ({"lam": -0.01}, "lambda"),
        ({"lam": float("inf")}, "lambda"),
        ({"lam": 1.0}, "lambda"),
        ({"ratios": [0.1]}, "one ratio per block"),
        ({"ratios": []}, "one ratio per block"),
        ({"ratios": [0.1, float("nan")]}, "finite"),
        ({"ratios": [0.1, -0.2]}, "non-negative"),
        ({"block_sizes": [0, 3]}, "positive"),
        ({"mapping": "linear"}, "mapping"),
    ],
)
def test_invalid_arguments(kwargs, message):
    args = {"ratios": [0.1, 0.2], "block_sizes": [3, 3], "target": 0.5, "lam": 0.1, **kwargs}
    with pytest.raises(ValueError, match=message):
        owl_sparsities(**args)


# --------------------------------------------------------------------------- exact counts


def _uniform_total(shapes, target, group):
    if group == "row":
        return sum(o * prune_count(i, target) for block in shapes for o, i in block)
    return sum(prune_count(o * i, target) for block in shapes for o, i in block)


def _total(counts, shapes, group):
    return sum(
        (o if group == "row" else 1) * k
        for block, ks in zip(shapes, counts, strict=True)
        for (o, _), k in zip(block, ks, strict=True)
    )


shape_st = st.tuples(st.integers(1, 50), st.integers(1, 50))


@given(
    shapes=st.lists(st.lists(shape_st, min_size=1, max_size=4), min_size=1, max_size=8),
    data=st.data(),
    target=targets,
    group=st.sampled_from(["row", "layer"]),
)
@FAST
def test_total_equals_uniform_exactly_for_any_sparsities(shapes, data, target, group):
    """Whatever per-block sparsities come in (even far from the target), the total comes out exact."""
    sparsities = data.draw(st.lists(st.floats(0, 1), min_size=len(shapes), max_size=len(shapes)))
    counts = owl_prune_counts(sparsities, shapes, target, group)
    assert _total(counts, shapes, group) == _uniform_total(shapes, target, group)
    for block, ks in zip(shapes, counts, strict=True):
        for (o, i), k in zip(block, ks, strict=True):
            assert 0 <= k <= (i if group == "row" else o * i)
    assert owl_prune_counts(sparsities, shapes, target, group) == counts  # deterministic


@given(
    ratios=st.lists(st.floats(0, 0.2, allow_nan=False), min_size=1, max_size=10),
    target=targets,
    lam=lams,
    group=st.sampled_from(["row", "layer"]),
    block=st.sampled_from([LLAMA, [(5, 7), (3, 11)], [(6, 13)]]),
)
# two blocks whose sparsities differ by one rounding: their increments cost the same, the sparser goes first
@example(ratios=[0.12991076889506242, 0.01387588380073033, 2.220446049250313e-16, 0.0], target=0.86, lam=0.02,
         group="row", block=LLAMA)
@FAST
def test_owl_counts_stay_close_to_owl_and_keep_its_order(ratios, target, lam, group, block):
    shapes = [block] * len(ratios)
    alloc = owl_allocate(ratios, shapes, target, lam, group=group)
    assert alloc.pruned == alloc.uniform_pruned == _uniform_total(shapes, target, group)
    assert alloc.total == len(ratios) * sum(o * i for o, i in block)
    for b, s in enumerate(alloc.block_sparsity):
        for li, (o, i) in enumerate(block):
            cap = i if group == "row" else o * i
            assert abs(alloc.counts[b][li] - s * cap) < 2  # "within two per row, usually one"
            assert prune_count(cap, alloc.sparsity[b][li]) == alloc.counts[b][li]
    for li in range(len(block)):  # a sparser block never prunes fewer weights in the same linear
        for a in range(len(ratios)):
            for c in range(len(ratios)):
                if alloc.block_sparsity[a] < alloc.block_sparsity[c]:
                    assert alloc.counts[a][li] <= alloc.counts[c][li]


def test_half_of_even_widths_is_floor_of_target_times_total():
    """When target * d_in is whole for every linear, 'exact' is literally floor(target * total)."""
    shapes = [LLAMA] * 6
    alloc = owl_allocate([0.01, 0.05, 0.02, 0.08, 0.03, 0.04], shapes, 0.5, 0.08)
    assert alloc.pruned == alloc.total // 2
    assert len(set(alloc.block_sparsity)) == 6  # and the blocks really differ


def test_floor_of_target_times_total_can_be_unreachable():
    """The documented reason for the definition: one 3x5 linear at 50% prunes 2 per row, 6 in all,
    while floor(0.5 * 15) = 7 is not a multiple of the 3 rows. OWL matches uniform's 6."""
    alloc = owl_allocate([0.1], [[(3, 5)]], 0.5, 0.1)
    assert alloc.pruned == alloc.uniform_pruned == 6 != math.floor(0.5 * 15)
    assert owl_allocate([0.1], [[(3, 5)]], 0.5, 0.1, group="layer").pruned == 7


def test_masks_built_from_the_allocation_prune_exactly_the_counts():
    g = torch.Generator().manual_seed(0)
    shapes = [[(6, 10), (4, 15)], [(6, 10), (4, 15)], [(6, 10), (4, 15)]]
    for group in ("row", "layer"):
        alloc = owl_allocate([0.02, 0.09, 0.04], shapes, 0.55, 0.1, group=group)
        pruned = 0
        for block, sps in zip(shapes, alloc.sparsity, strict=True):
            for (o, i), s in zip(block, sps, strict=True):
                pruned += int((~make_mask(torch.rand(o, i, generator=g), s, group=group)).sum())
        assert pruned == alloc.pruned == alloc.uniform_pruned


def test_equal_ratios_give_uniform_counts():
    shapes = [LLAMA] * 4
    alloc = owl_allocate([0.05] * 4, shapes, 0.7, 0.1)
    assert alloc.counts == [[prune_count(i, 0.7) for _, i in LLAMA]] * 4
    assert alloc.block_sparsity == [0.7] * 4


def test_one_block():
    alloc = owl_allocate([0.3], [LLAMA], 0.45, 0.2)
    assert alloc.block_sparsity == [0.45]
    assert alloc.counts == [[prune_count(i, 0.45) for _, i in LLAMA]]


def test_blocks_with_different_linears_still_exact():
    """E.g. a linear ignored in one block only: groups of interchangeable units are balanced separately."""
    shapes = [LLAMA, LLAMA[:-1], LLAMA[1:], LLAMA]
    for group in ("row", "layer"):
        alloc = owl_allocate([0.01, 0.2, 0.05, 0.07], shapes, 0.6, 0.15, group=group)
        assert alloc.pruned == alloc.uniform_pruned == _uniform_total(shapes, 0.6, group)


def test_prune_counts_invalid_arguments():
    with pytest.raises(ValueError, match="one sparsity per block"):
        owl_prune_counts([0.5], [[(2, 2)], [(2, 2)]], 0.5)
    with pytest.raises(ValueError, match="group"):
        owl_prune_counts([0.5], [[(2, 2)]], 0.5, group="column")
    with pytest.raises(ValueError, match="sparsity must lie"):
        owl_prune_counts([1.5], [[(2, 2)]], 0.5)
    with pytest.raises(ValueError, match="invalid shape"):
        owl_prune_counts([0.5], [[(0, 2)]], 0.5)
    with pytest.raises(ValueError, match="at least one prunable linear"):
        owl_allocate([0.1, 0.2], [[(2, 2)], []], 0.5, 0.1)


# --------------------------------------------------------------------------- count_sparsity


def test_count_sparsity_fixes_float_rounding_of_large_layers():
    """count / n would give prune_count(n, count / n) == count - 1 for these (per-layer groups of ~1e8)."""
    for n, k in [(93414274, 24457309), (48348234, 27591152), (45964705, 31767350)]:
        assert prune_count(n, k / n) == k - 1
        assert prune_count(n, count_sparsity(k, n)) == k


@given(n=st.integers(1, 10**9), data=st.data())
@settings(max_examples=200, deadline=None)
def test_count_sparsity_round_trips(n, data):
    k = data.draw(st.integers(0, n))
    assert prune_count(n, count_sparsity(k, n)) == k


def test_count_sparsity_rejects_impossible_counts():
    with pytest.raises(ValueError, match="cannot prune"):
        count_sparsity(6, 5)

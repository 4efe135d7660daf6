"""Masks: exact counts, top-score selection, N:M groups, deterministic tie-breaking (lower index pruned first)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from optimum_statprune.tensor_math.masks import make_mask, nm_mask, prune_count, unstructured_mask

FAST = settings(max_examples=80, deadline=None)


def _scores(d_out: int, d_in: int, seed: int, levels: int, dtype=torch.float32) -> torch.Tensor:
    """Random scores; ``levels`` > 0 draws from that many distinct values (forces ties), 0 = continuous."""
    g = torch.Generator().manual_seed(seed)
    if levels:
        return torch.randint(0, levels, (d_out, d_in), generator=g).to(dtype)
    return torch.rand(d_out, d_in, generator=g, dtype=torch.float64).to(dtype)


def ref_prune_lowest(values: list[float], k: int) -> list[bool]:
    """Keep-mask dropping the k lowest values; among equal values the lower index goes first."""
    order = sorted(range(len(values)), key=lambda j: (values[j], j))
    pruned = set(order[:k])
    return [j not in pruned for j in range(len(values))]


def _check_group(scores: list[float], keep: list[bool], k: int) -> None:
    """The properties the reference encodes, stated one by one."""
    pruned = [s for s, m in zip(scores, keep, strict=True) if not m]
    kept = [s for s, m in zip(scores, keep, strict=True) if m]
    assert len(pruned) == k
    if pruned and kept:
        assert max(pruned) <= min(kept)
    for a in range(len(scores)):
        for b in range(len(scores)):
            if scores[a] == scores[b] and not keep[a] and keep[b]:
                assert a < b  # ties: the lower index is pruned first


sparsities = st.integers(1, 99).map(lambda p: p / 100)


# --------------------------------------------------------------------------- prune_count


@given(n=st.integers(0, 100_000), p=st.integers(0, 1000))
@settings(max_examples=100, deadline=None)
def test_prune_count_is_floor_of_decimal_fraction(n, p):
    assert prune_count(n, p / 1000) == (p * n) // 1000


def test_prune_count_examples():
    assert prune_count(5, 0.5) == 2
    assert prune_count(10, 0.3) == 3
    assert prune_count(100, 0.29) == 29  # 0.29 * 100 == 28.999999999999996 in floating point
    assert prune_count(7, 0.999) == 6
    assert prune_count(4096, 0.7) == 2867
    assert prune_count(3, 1.0) == 3


# --------------------------------------------------------------------------- unstructured


def test_odd_width_half_prunes_two_of_five():
    """Stated behaviour: 50% of a row of width 5 prunes floor(2.5) = 2 and keeps 3."""
    scores = torch.tensor([[5.0, 1.0, 4.0, 2.0, 3.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    mask = unstructured_mask(scores, 0.5)
    assert mask.tolist() == [[True, False, True, False, True], [False, False, True, True, True]]
    assert (~mask).sum(1).tolist() == [2, 2]
    # Per layer, 50% of 10 weights prunes 5; a 3x5 layer (15 weights) prunes 7.
    assert (~unstructured_mask(scores, 0.5, "layer")).sum() == 5
    assert (~unstructured_mask(torch.rand(3, 5), 0.5, "layer")).sum() == 7


def test_all_equal_scores_prune_lowest_indices_first():
    scores = torch.ones(3, 8)
    assert unstructured_mask(scores, 0.5).tolist() == [[False] * 4 + [True] * 4] * 3
    layer = unstructured_mask(scores, 0.5, "layer")
    assert layer.flatten().tolist() == [False] * 12 + [True] * 12
    assert nm_mask(scores, 2, 4).tolist() == [[False, False, True, True] * 2] * 3
    assert nm_mask(torch.zeros(1, 8), 1, 4).tolist() == [[False, False, False, True] * 2]


@FAST
@given(
    d_out=st.integers(1, 6),
    d_in=st.integers(1, 40),
    sparsity=sparsities,
    seed=st.integers(0, 10_000),
    levels=st.sampled_from([0, 1, 2, 3, 7]),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.float16, torch.bfloat16]),
)
def test_unstructured_row(d_out, d_in, sparsity, seed, levels, dtype):
    scores = _scores(d_out, d_in, seed, levels, dtype)
    mask = unstructured_mask(scores, sparsity, "row")
    assert mask.dtype == torch.bool and mask.shape == scores.shape
    k = (round(sparsity * 100) * d_in) // 100
    values = scores.to(torch.float64).tolist()
    for i in range(d_out):
        keep = mask[i].tolist()
        assert keep == ref_prune_lowest(values[i], k)
        _check_group(values[i], keep, k)
    assert torch.equal(mask, unstructured_mask(scores.clone(), sparsity, "row"))  # deterministic


@FAST
@given(
    d_out=st.integers(1, 6),
    d_in=st.integers(1, 20),
    sparsity=sparsities,
    seed=st.integers(0, 10_000),
    levels=st.sampled_from([0, 1, 2, 5]),
)
def test_unstructured_layer(d_out, d_in, sparsity, seed, levels):
    scores = _scores(d_out, d_in, seed, levels)
    mask = unstructured_mask(scores, sparsity, "layer")
    assert mask.shape == scores.shape
    k = (round(sparsity * 100) * d_out * d_in) // 100
    flat = scores.flatten().tolist()
    keep = mask.flatten().tolist()
    assert keep == ref_prune_lowest(flat, k)
    _check_group(flat, keep, k)
    assert torch.equal(mask, unstructured_mask(scores, sparsity, "layer"))


def test_row_and_layer_groups_differ():
    scores = torch.tensor([[1.0, 2.0, 3.0, 4.0], [10.0, 20.0, 30.0, 40.0]])
    assert unstructured_mask(scores, 0.5, "row").tolist() == [[False, False, True, True]] * 2
    assert unstructured_mask(scores, 0.5, "layer").tolist() == [[False] * 4, [True] * 4]


def test_nan_scores_are_pruned_first():
    scores = torch.tensor([[0.5, float("nan"), -1.0, 2.0, float("-inf"), 1.0]])
    mask = unstructured_mask(scores, 0.5)
    assert mask.tolist() == [[True, False, False, True, False, True]]


def test_float64_scores_keep_their_precision():
    # Distinct in float64, all equal to 1.0 in float32 (where the tie rule would prune indices 0 and 1).
    scores = torch.tensor([[1.0 + 3e-12, 1.0 + 1e-12, 1.0 + 2e-12, 1.0]], dtype=torch.float64)
    assert unstructured_mask(scores, 0.5).tolist() == [[True, False, True, False]]
    assert unstructured_mask(scores, 0.5, "layer").tolist() == [[True, False, True, False]]
    assert nm_mask(scores, 2, 4).tolist() == [[True, False, True, False]]


def test_inputs_not_modified():
    scores = torch.rand(4, 8)
    before = scores.clone()
    unstructured_mask(scores, 0.5)
    unstructured_mask(scores, 0.5, "layer")
    nm_mask(scores, 2, 4)
    assert torch.equal(scores, before)


def test_unknown_group_raises():
    with pytest.raises(ValueError, match="group"):
        unstructured_mask(torch.rand(2, 4), 0.5, "column")


# --------------------------------------------------------------------------- N:M


@st.composite
def nm_shapes(draw):
    m = draw(st.integers(2, 8))
    n = draw(st.integers(1, m - 1))
    groups = draw(st.integers(1, 6))
    d_out = draw(st.integers(1, 4))
    return n, m, d_out, groups * m


@FAST
@given(shape=nm_shapes(), seed=st.integers(0, 10_000), levels=st.sampled_from([0, 1, 2, 3]))
def test_nm_mask(shape, seed, levels):
    n, m, d_out, d_in = shape
    scores = _scores(d_out, d_in, seed, levels)
    mask = nm_mask(scores, n, m)
    assert mask.dtype == torch.bool and mask.shape == scores.shape
    values = scores.tolist()
    for i in range(d_out):
        for g in range(d_in // m):
            group = values[i][g * m : (g + 1) * m]
            keep = mask[i, g * m : (g + 1) * m].tolist()
            assert sum(keep) == n
            assert keep == ref_prune_lowest(group, m - n)
            _check_group(group, keep, m - n)
    assert torch.equal(mask, make_mask(scores, 0.123, f"{n}:{m}"))  # sparsity ignored for N:M
    assert torch.equal(mask, nm_mask(scores, n, m))


@pytest.mark.parametrize("d_in, m", [(6, 4), (5, 2), (10, 8), (3, 4)])
def test_nm_width_not_multiple_of_m_raises_clearly(d_in, m):
    with pytest.raises(ValueError) as info:
        nm_mask(torch.rand(2, d_in), 1, m)
    msg = str(info.value)
    assert f"multiple of {m}" in msg
    assert str(d_in) in msg
    with pytest.raises(ValueError, match=f"multiple of {m}"):
        make_mask(torch.rand(2, d_in), 0.5, f"1:{m}")


@pytest.mark.parametrize("n, m", [(0, 4), (4, 4), (5, 4), (-1, 2)])
def test_nm_invalid_pattern_raises(n, m):
    with pytest.raises(ValueError, match="0 < N < M"):
        nm_mask(torch.rand(2, 8), n, m)


def test_nm_explicit_2_4():
    scores = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.1, 0.4, 0.3, 0.2]])
    assert nm_mask(scores, 2, 4).tolist() == [[True, True, False, False, False, True, True, False]]


def test_make_mask_dispatch():
    scores = _scores(3, 8, seed=1, levels=0)
    assert torch.equal(make_mask(scores, 0.25), unstructured_mask(scores, 0.25, "row"))
    assert torch.equal(
        make_mask(scores, 0.25, "unstructured", "layer"), unstructured_mask(scores, 0.25, "layer")
    )
    assert torch.equal(make_mask(scores, 0.5, "2:4"), nm_mask(scores, 2, 4))
    assert torch.equal(make_mask(scores, 0.5, "4:8"), nm_mask(scores, 4, 8))

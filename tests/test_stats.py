"""ChannelStats: exact moments, independence of the batch split, padding, subsample, merge, half precision."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from optimum_statprune.tensor_math.stats import ChannelStats, HessianAccumulator, LayerStatistics, token_keys

FAST = settings(max_examples=60, deadline=None)


def _tokens(n: int, d: int, seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, d, generator=g, dtype=torch.float64) * 3 + 1.5).to(dtype)


def _accumulate(x: torch.Tensor, sizes: list[int], **kwargs) -> ChannelStats:
    stats = ChannelStats(x.shape[-1], **kwargs)
    start = 0
    for size in sizes:
        stats.update(x[start : start + size])
        start += size
    assert start == x.shape[0]
    return stats


def _assert_same_stats(a: ChannelStats, b: ChannelStats) -> None:
    assert a.count == b.count
    torch.testing.assert_close(a.sum, b.sum, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a.sumsq, b.sumsq, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a.mean, b.mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a.variance, b.variance, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a.norm, b.norm, rtol=1e-12, atol=1e-12)
    if a.sample is None or b.sample is None:
        assert a.sample is None and b.sample is None
    else:
        assert torch.equal(a.sample, b.sample)


def _split(n: int, cuts: list[int]) -> list[int]:
    """Batch sizes from cut points (possibly empty batches)."""
    points = [0, *sorted(c % (n + 1) for c in cuts), n]
    return [b - a for a, b in zip(points[:-1], points[1:], strict=True)]


# --------------------------------------------------------------------------- moments vs loops


def test_moments_match_naive_loops():
    x = _tokens(37, 5, seed=1)
    stats = ChannelStats(5)
    stats.update(x)
    rows = x.tolist()
    n = len(rows)
    assert stats.count == n
    for j in range(5):
        col = [rows[t][j] for t in range(n)]
        mean = math.fsum(col) / n
        m2 = math.fsum(v * v for v in col) / n
        var = math.fsum((v - mean) ** 2 for v in col) / n  # two-pass, population
        norm = math.sqrt(math.fsum(v * v for v in col))
        assert math.isclose(stats.mean[j].item(), mean, rel_tol=1e-12)
        assert math.isclose(stats.second_moment[j].item(), m2, rel_tol=1e-12)
        assert math.isclose(stats.variance[j].item(), var, rel_tol=1e-10)
        assert math.isclose(stats.norm[j].item(), norm, rel_tol=1e-12)
    assert stats.sum.dtype == stats.sumsq.dtype == torch.float64


def test_accepts_any_leading_shape():
    x = _tokens(24, 4, seed=2)
    flat = ChannelStats(4)
    flat.update(x)
    nested = ChannelStats(4)
    nested.update(x.reshape(2, 3, 4, 4))
    _assert_same_stats(flat, nested)


def test_constant_channel_has_zero_variance_not_negative():
    x = torch.full((1000, 3), 0.1, dtype=torch.float32)
    stats = ChannelStats(3)
    stats.update(x)
    assert torch.all(stats.variance >= 0)
    torch.testing.assert_close(stats.variance, torch.zeros(3, dtype=torch.float64), atol=1e-12, rtol=0)


def test_no_tokens_and_wrong_width_raise():
    stats = ChannelStats(4)
    with pytest.raises(ValueError, match="no calibration tokens"):
        _ = stats.mean
    with pytest.raises(ValueError, match="no calibration tokens"):
        _ = stats.variance
    with pytest.raises(ValueError, match="4 channels"):
        stats.update(torch.zeros(2, 5))
    stats.update(torch.zeros(0, 4))
    assert stats.count == 0


# --------------------------------------------------------------------------- batch-split independence


@FAST
@given(
    n=st.integers(1, 60),
    d=st.integers(1, 6),
    cuts=st.lists(st.integers(0, 10_000), max_size=8),
    sample_size=st.integers(0, 70),
    seed=st.integers(0, 2**31 - 1),
    data_seed=st.integers(0, 1000),
)
def test_batch_split_does_not_change_anything(n, d, cuts, sample_size, seed, data_seed):
    x = _tokens(n, d, seed=data_seed, dtype=torch.float32)
    one = _accumulate(x, [n], sample_size=sample_size, seed=seed)
    many = _accumulate(x, _split(n, cuts), sample_size=sample_size, seed=seed)
    singles = _accumulate(x, [1] * n, sample_size=sample_size, seed=seed)
    _assert_same_stats(one, many)
    _assert_same_stats(one, singles)
    if sample_size:
        assert one.sample.shape == (min(n, sample_size), d)
    else:
        assert one.sample is None


def test_uneven_batches_explicit():
    x = _tokens(1000, 8, seed=3, dtype=torch.float32)
    one = _accumulate(x, [1000], sample_size=64, seed=5)
    many = _accumulate(x, [1, 333, 7, 0, 459, 200], sample_size=64, seed=5)
    _assert_same_stats(one, many)


# --------------------------------------------------------------------------- subsample


def test_sample_is_bottom_k_of_hashed_global_index():
    n, d, k, seed = 200, 3, 17, 11
    x = _tokens(n, d, seed=4)
    stats = _accumulate(x, [50, 50, 100], sample_size=k, seed=seed)
    keys = token_keys(torch.arange(n, dtype=torch.int64), seed)
    assert keys.unique().numel() == n  # keys are unique per index
    expected = torch.argsort(keys)[:k]
    assert torch.equal(stats.sample, x[expected])
    # A hashed sample, not simply the first (or last) k tokens.
    assert set(expected.tolist()) != set(range(k))
    assert set(expected.tolist()) != set(range(n - k, n))


def test_sample_rows_are_real_rows_and_depend_on_seed():
    n, d, k = 300, 4, 40
    x = _tokens(n, d, seed=6)
    a = _accumulate(x, [n], sample_size=k, seed=0)
    b = _accumulate(x, [n], sample_size=k, seed=0)
    c = _accumulate(x, [n], sample_size=k, seed=1)
    assert torch.equal(a.sample, b.sample)
    for row in a.sample:
        assert (x == row).all(dim=1).sum() == 1
    assert not torch.equal(a.sample, c.sample)


def test_sample_larger_than_token_count_keeps_all_tokens():
    x = _tokens(10, 3, seed=7)
    stats = _accumulate(x, [4, 6], sample_size=100)
    assert stats.sample.shape == (10, 3)
    assert sorted(map(tuple, stats.sample.tolist())) == sorted(map(tuple, x.tolist()))


def test_sample_keeps_input_dtype():
    x = _tokens(20, 3, seed=8, dtype=torch.float16)
    stats = _accumulate(x, [20], sample_size=5)
    assert stats.sample.dtype == torch.float16


# --------------------------------------------------------------------------- padding


def test_padding_excluded_by_mask():
    g = torch.Generator().manual_seed(9)
    batch, seq, d = 4, 9, 5
    lengths = [9, 3, 6, 1]
    x = torch.randn(batch, seq, d, generator=g, dtype=torch.float64)
    mask = torch.zeros(batch, seq, dtype=torch.bool)
    for b, length in enumerate(lengths):
        mask[b, :length] = True
    x[~mask] = 1e6  # padding rows carry garbage that would dominate every statistic
    real = torch.cat([x[b, :length] for b, length in enumerate(lengths)])

    padded = ChannelStats(d, sample_size=7, seed=3)
    padded.update(x, mask)
    clean = ChannelStats(d, sample_size=7, seed=3)
    clean.update(real)

    assert padded.count == sum(lengths)
    _assert_same_stats(padded, clean)
    assert padded.sample.abs().max() < 1e3

    # Padding in different places of different batches still gives the same result.
    per_sequence = ChannelStats(d, sample_size=7, seed=3)
    for b in range(batch):
        per_sequence.update(x[b : b + 1], mask[b : b + 1])
    _assert_same_stats(per_sequence, clean)


def test_all_padding_batch_changes_nothing():
    x = _tokens(12, 3, seed=10)
    stats = _accumulate(x, [12], sample_size=4)
    before = (stats.count, stats.sum.clone(), stats.sumsq.clone(), stats.sample.clone())
    stats.update(torch.full((2, 5, 3), 7.0, dtype=torch.float64), torch.zeros(2, 5, dtype=torch.bool))
    assert stats.count == before[0]
    assert torch.equal(stats.sum, before[1]) and torch.equal(stats.sumsq, before[2])
    assert torch.equal(stats.sample, before[3])


def test_integer_mask_accepted():
    x = _tokens(6, 2, seed=11).reshape(2, 3, 2)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    stats = ChannelStats(2)
    stats.update(x, mask)
    assert stats.count == 3
    torch.testing.assert_close(stats.sum, x[0, 0] + x[0, 1] + x[1, 0], rtol=1e-12, atol=0)


# --------------------------------------------------------------------------- merge


@FAST
@given(
    n=st.integers(0, 60),
    cut=st.integers(0, 60),
    cuts=st.lists(st.integers(0, 10_000), max_size=4),
    sample_size=st.integers(0, 40),
    seed=st.integers(0, 1000),
)
def test_merge_equals_single_accumulator(n, cut, cuts, sample_size, seed):
    d = 3
    x = _tokens(n, d, seed=seed, dtype=torch.float32)
    cut = min(cut, n)
    single = _accumulate(x, _split(n, cuts), sample_size=sample_size, seed=seed)
    a = _accumulate(x[:cut], _split(cut, cuts), sample_size=sample_size, seed=seed, index_offset=0)
    b = _accumulate(x[cut:], [n - cut], sample_size=sample_size, seed=seed, index_offset=cut)
    merged = a.merge(b)
    assert merged is a
    assert merged.count == single.count
    torch.testing.assert_close(merged.sum, single.sum, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(merged.sumsq, single.sumsq, rtol=1e-12, atol=1e-12)
    if n:
        _assert_same_stats(merged, single)
    else:
        assert merged.sample is None


def test_merge_in_either_order_gives_same_sample():
    x = _tokens(90, 4, seed=12)
    parts = [(0, 30), (30, 75), (75, 90)]
    accs = [_accumulate(x[s:e], [e - s], sample_size=20, seed=2, index_offset=s) for s, e in parts]
    forward = _accumulate(x[:0], [0], sample_size=20, seed=2)
    for acc in accs:
        forward.merge(acc)
    accs2 = [_accumulate(x[s:e], [e - s], sample_size=20, seed=2, index_offset=s) for s, e in parts]
    backward = accs2[2].merge(accs2[0]).merge(accs2[1])
    single = _accumulate(x, [90], sample_size=20, seed=2)
    _assert_same_stats(forward, single)
    _assert_same_stats(backward, single)


def test_merge_rejects_other_width():
    with pytest.raises(ValueError, match="merge"):
        ChannelStats(3).merge(ChannelStats(4))


# --------------------------------------------------------------------------- half precision, large offsets


def _half_tokens(dtype: torch.dtype, n: int = 4096, d: int = 16) -> torch.Tensor:
    g = torch.Generator().manual_seed(13)
    if dtype == torch.float16:
        # fp16 spacing near 1e4 is 8, so noise of a few units leaves a few distinct values per channel.
        x = 1e4 + 6.0 * torch.randn(n, d, generator=g, dtype=torch.float64)
    else:
        # bf16 spacing near 1e4 is 64: values land on 9984 or 10048 (a small, rounding-made variance).
        x = 1e4 + 8.0 * torch.randn(n, d, generator=g, dtype=torch.float64)
    return x.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_large_mean_small_variance(dtype):
    x = _half_tokens(dtype)
    exact = x.to(torch.float64)  # the rounded values, exactly
    ref_mean = exact.mean(0)
    ref_var = ((exact - ref_mean) ** 2).mean(0)  # two-pass, float64
    assert torch.all(ref_var > 1.0)  # the test data does have a (small) variance
    assert torch.all(ref_var / ref_mean**2 < 1e-4)

    stats = _accumulate(x, [1000, 1, 2047, 1048], sample_size=8)
    # Half-precision batches are summed in float32 about their own mean: the variance keeps ~1e-7 of
    # float32's precision (the inputs' own rounding is 5e-4 for fp16), never the cancellation's loss.
    torch.testing.assert_close(stats.mean, ref_mean, rtol=1e-12, atol=0)
    torch.testing.assert_close(stats.variance, ref_var, rtol=1e-6, atol=0)
    torch.testing.assert_close(stats.second_moment, (exact**2).mean(0), rtol=1e-12, atol=0)
    assert torch.isfinite(stats.norm).all()  # ||X_j||^2 ~ 4e11 overflows fp16 but not float64

    # A float32 running accumulator (what a naive implementation would keep) gets this wrong.
    s32 = torch.zeros(x.shape[1])
    q32 = torch.zeros(x.shape[1])
    for batch in x.split(256):
        b = batch.to(torch.float32)
        s32 += b.sum(0)
        q32 += b.square().sum(0)
    naive_var = (q32 / x.shape[0] - (s32 / x.shape[0]) ** 2).to(torch.float64)
    assert ((naive_var - ref_var).abs() / ref_var).max() > 0.05


def test_large_global_index_offsets_still_split_independent():
    x = _tokens(50, 2, seed=14)
    offset = 3_000_000_000  # beyond 2^31 tokens
    one = _accumulate(x, [50], sample_size=10, index_offset=offset)
    many = _accumulate(x, [20, 30], sample_size=10, index_offset=offset)
    _assert_same_stats(one, many)


def test_token_keys_deterministic_and_seeded():
    idx = torch.arange(10_000, dtype=torch.int64)
    k0 = token_keys(idx, 0)
    assert torch.equal(k0, token_keys(idx, 0))
    assert k0.unique().numel() == idx.numel()
    assert (k0 >= 0).all()
    assert not torch.equal(torch.argsort(k0), torch.argsort(token_keys(idx, 1)))
    # Roughly uniform: the bottom 10% of keys are spread over the whole index range.
    chosen = torch.argsort(k0)[:1000]
    hist = torch.bincount(chosen // 1000, minlength=10)
    assert hist.min() > 50


# ---------------------------------------------------------------------------------------------- LayerStatistics
@pytest.mark.parametrize(("channel", "hessian"), [(True, False), (False, True), (True, True)])
def test_layer_statistics_feed_exactly_the_statistics_asked_for(channel, hessian):
    """Each statistic kept sees the same real tokens (padding dropped), as if fed on its own."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 4, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    layer = LayerStatistics(4, channel=channel, hessian=hessian, sample_size=3, seed=1)
    layer.update(x[:1], mask[:1])
    layer.update(x[1:], mask[1:])
    real = x[mask]  # [8, 4]
    assert layer.count == 8
    assert (layer.channel is not None) is channel and (layer.hessian is not None) is hessian
    if channel:
        alone = ChannelStats(4, 3, seed=1)
        alone.update(x, mask)
        torch.testing.assert_close(layer.channel.sumsq, alone.sumsq)
        torch.testing.assert_close(layer.channel.sample, alone.sample)
        sumsq = [sum(float(real[t, j]) ** 2 for t in range(8)) for j in range(4)]
        torch.testing.assert_close(layer.channel.sumsq, torch.tensor(sumsq, dtype=torch.float64))
    if hessian:
        xtx = [[sum(float(real[t, i]) * float(real[t, j]) for t in range(8)) for j in range(4)] for i in range(4)]
        torch.testing.assert_close(layer.hessian.xtx.double(), torch.tensor(xtx, dtype=torch.float64), rtol=1e-6, atol=1e-6)
        assert isinstance(layer.hessian, HessianAccumulator)


def test_layer_statistics_need_at_least_one_statistic():
    with pytest.raises(ValueError, match="at least one statistic"):
        LayerStatistics(4, channel=False, hessian=False)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_shifted_sums_match_float64(dtype):
    """The half-precision path (float32 sums about each batch's mean) against float64 sums of the same
    rounded values: zero-mean, large-mean, tiny and massive channels, with padding dropped."""
    g = torch.Generator().manual_seed(21)
    x = torch.randn(3, 700, 6, generator=g, dtype=torch.float64)
    x[..., 1] = 200 + 0.5 * x[..., 1]  # var / m2 ~ 6e-6
    x[..., 2] *= 1e-3
    x[0, :5, 3] = 1e4  # massive activations in a few tokens
    x = x.to(dtype)
    mask = torch.rand(3, 700, generator=g) > 0.2
    stats = ChannelStats(6)
    for b in range(3):
        stats.update(x[b], mask[b])
    exact = x[mask].to(torch.float64)
    ref_var = ((exact - exact.mean(0)) ** 2).mean(0)
    assert stats.count == exact.shape[0]
    # float32 precision relative to the spread (the sums are about the mean), float64 for the mean itself
    spread = (exact - exact.mean(0)).abs().sum(0)
    assert torch.all((stats.sum - exact.sum(0)).abs() <= 1e-6 * spread)
    torch.testing.assert_close(stats.variance, ref_var, rtol=1e-6, atol=0)
    torch.testing.assert_close(stats.norm, exact.square().sum(0).sqrt(), rtol=1e-6, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Welford's statistics run on CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_welford_on_cuda_matches_float64(dtype):
    """The CUDA path (per-batch Welford mean and variance in float32, then float64 sums) against float64
    sums of the same rounded values: zero-mean, large-mean (var / m2 ~ 6e-6), tiny, constant and massive
    channels, padding dropped, and the subsample the same as on a CPU. Tolerances: the variance is
    Welford's in float32 (no cancellation in ``m2 - mean^2``), measured 2.2e-6 relative at worst on the
    H200 for the large-mean channel in bfloat16, so 1e-5; the mean carries float32's rounding of the values
    it averages (~1e-7 of the channel's largest magnitude, not of the spread), and so does the second
    moment; a constant channel keeps only float64's rounding of ``m2 - mean^2`` (1.6e-14 for 3.0)."""
    g = torch.Generator().manual_seed(21)
    x = torch.randn(3, 700, 7, generator=g, dtype=torch.float64)
    x[..., 1] = 200 + 0.5 * x[..., 1]
    x[..., 2] *= 1e-3
    x[0, :5, 3] = 1e4
    x[..., 6] = 3.0  # constant: variance exactly 0
    x = x.to(dtype)
    mask = torch.rand(3, 700, generator=g) > 0.2
    stats = ChannelStats(7, sample_size=64, seed=3, device="cuda")
    for b in range(3):
        stats.update(x[b].cuda(), mask[b].cuda())
    exact = x[mask].to(torch.float64)
    ref_mean = exact.mean(0)
    ref_var = ((exact - ref_mean) ** 2).mean(0)
    assert stats.count == exact.shape[0]
    assert torch.all((stats.mean.cpu() - ref_mean).abs() <= 1e-6 * exact.abs().amax(0))
    torch.testing.assert_close(stats.variance.cpu()[:6], ref_var[:6], rtol=1e-5, atol=0)
    assert 0.0 <= float(stats.variance[6]) <= 1e-12 * 3.0**2
    m2 = (exact**2).mean(0)
    assert torch.all((stats.second_moment.cpu() - m2).abs() <= 1e-5 * m2 + 3e-6 * exact.abs().amax(0) * ref_mean.abs())
    cpu = ChannelStats(7, sample_size=64, seed=3)  # the subsample does not depend on the device
    for b in range(3):
        cpu.update(x[b], mask[b])
    assert torch.equal(stats.sample.cpu(), cpu.sample)


def test_linears_reading_one_batch_keep_the_same_token_rows():
    """q/k/v (one input, one seed per block) keep the same subsample positions; a second batch and another
    seed still pick by global index, as an unshared computation would."""
    x = _tokens(300, 4, seed=30)
    a, b = ChannelStats(4, sample_size=16, seed=9), ChannelStats(4, sample_size=16, seed=9)
    for part in x.split(120):
        a.update(part)
        b.update(part * 2)
    torch.testing.assert_close(b.sample, a.sample * 2, rtol=0, atol=0)
    order = torch.argsort(token_keys(torch.arange(300), 9))[:16]
    torch.testing.assert_close(a.sample, x[order], rtol=0, atol=0)
    other = _accumulate(x, [300], sample_size=16, seed=10)
    torch.testing.assert_close(other.sample, x[torch.argsort(token_keys(torch.arange(300), 10))[:16]], rtol=0, atol=0)


def test_explicit_token_indices_pick_the_subsample_by_global_index():
    """An accumulator that sees some of the tokens (an MoE expert) numbers them by ``index``: its subsample is
    the bottom-k of those indices' keys, however its tokens are split into batches or over accumulators."""
    x = _tokens(60, 3, seed=22)
    picked = torch.tensor(sorted({(7 * i) % 60 for i in range(25)}))  # the tokens routed here
    rows = x[picked]
    keys = token_keys(picked, 5)
    order = torch.argsort(keys)[:6]
    expected = rows[order]

    one = ChannelStats(3, sample_size=6, seed=5)
    one.update(rows, index=picked)
    torch.testing.assert_close(one.sample, expected, rtol=0, atol=0)

    a, b = ChannelStats(3, sample_size=6, seed=5), ChannelStats(3, sample_size=6, seed=5)
    a.update(rows[:10], index=picked[:10])
    b.update(rows[10:17], index=picked[10:17])
    b.update(rows[17:], index=picked[17:])
    _assert_same_stats(a.merge(b), one)

    with pytest.raises(ValueError, match="token indices"):
        ChannelStats(3, sample_size=6).update(rows, index=picked[:5])

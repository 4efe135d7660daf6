"""Compensation against naive references written with explicit loops in float64; mask preservation; safety check."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from optimum_statprune.tensor_math.compensation import (
    activation_energy_row_scale,
    bias_shift,
    compensate,
    ec_column_scale,
    ec_row_scale,
    energy_compensation,
    lsq_row_scale,
    output_error,
    row_scaled_errors,
    times_transpose,
)
from optimum_statprune.tensor_math.masks import nm_mask, unstructured_mask
from optimum_statprune.tensor_math.stats import ChannelStats

FAST = settings(max_examples=50, deadline=None)
STEPS = ["column", "row", "column,row", "row,column"]


def _weight(d_out: int = 6, d_in: int = 8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(d_out, d_in, generator=g, dtype=torch.float64) * 0.3 + 0.05


def _mask(w: torch.Tensor, sparsity: float = 0.5, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return unstructured_mask(torch.rand(w.shape, generator=g) * w.abs().float(), sparsity)


def _tokens(n: int, d_in: int, seed: int = 2, mean: float = 0.5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_in, generator=g, dtype=torch.float64) + mean


def _stats(x: torch.Tensor, sample_size: int = 0) -> ChannelStats:
    stats = ChannelStats(x.shape[1], sample_size=sample_size)
    stats.update(x)
    return stats


def _close(actual: torch.Tensor, expected, rtol: float = 1e-5, atol: float = 1e-6) -> None:
    expected = torch.as_tensor(expected, dtype=torch.float64)
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual.to(torch.float64), expected, rtol=rtol, atol=atol)


# ----------------------------------------------------------------- naive references (lists, loops)


def _clamp(v: float, lo: float, hi: float) -> float:
    return min(max(v, lo), hi)


def _ratio(num: float, den: float, lo: float, hi: float) -> float:
    return _clamp(math.sqrt(num / den) if den > 1e-12 else 1.0, lo, hi)


def ref_column_factors(w0, w, centered, lo, hi):
    d_out, d_in = len(w0), len(w0[0])
    out = []
    for j in range(d_in):
        mu = sum(w0[i][j] for i in range(d_out)) / d_out if centered else 0.0
        e0 = sum((w0[i][j] - mu) ** 2 for i in range(d_out))
        e1 = sum((w[i][j] - mu) ** 2 for i in range(d_out))
        out.append(_ratio(e0, e1, lo, hi))
    return out


def ref_row_factors(w0, w, centered, lo, hi):
    d_out, d_in = len(w0), len(w0[0])
    out = []
    for i in range(d_out):
        mu = sum(w0[i][j] for j in range(d_in)) / d_in if centered else 0.0
        e0 = sum((w0[i][j] - mu) ** 2 for j in range(d_in))
        e1 = sum((w[i][j] - mu) ** 2 for j in range(d_in))
        out.append(_ratio(e0, e1, lo, hi))
    return out


def ref_ec(w0, mask, steps, centered, lo, hi):
    d_out, d_in = len(w0), len(w0[0])
    w = [[w0[i][j] if mask[i][j] else 0.0 for j in range(d_in)] for i in range(d_out)]
    for step in steps.split(","):
        if step == "column":
            c = ref_column_factors(w0, w, centered, lo, hi)
            w = [[w[i][j] * c[j] if mask[i][j] else 0.0 for j in range(d_in)] for i in range(d_out)]
        else:
            r = ref_row_factors(w0, w, centered, lo, hi)
            w = [[w[i][j] * r[i] if mask[i][j] else 0.0 for j in range(d_in)] for i in range(d_out)]
    return w


def ref_activation_scale(w0, mask, m2, lo, hi):
    out = []
    for i in range(len(w0)):
        num = sum(w0[i][j] ** 2 * m2[j] for j in range(len(m2)))
        den = sum(w0[i][j] ** 2 * m2[j] for j in range(len(m2)) if mask[i][j])
        out.append(_ratio(num, den, lo, hi))
    return out


def ref_lsq(w0, w, x):
    out = []
    for i in range(len(w0)):
        y0 = [sum(x[t][j] * w0[i][j] for j in range(len(x[t]))) for t in range(len(x))]
        y = [sum(x[t][j] * w[i][j] for j in range(len(x[t]))) for t in range(len(x))]
        den = sum(v * v for v in y)
        out.append(sum(a * b for a, b in zip(y0, y, strict=True)) / den if den > 1e-12 else 1.0)
    return out


def ref_bias(w0, mask, mu):
    return [sum(w0[i][j] * mu[j] for j in range(len(mu)) if not mask[i][j]) for i in range(len(w0))]


def ref_output_error(w0, w, x, delta=None):
    total = 0.0
    for t in range(len(x)):
        for i in range(len(w0)):
            y0 = sum(x[t][j] * w0[i][j] for j in range(len(x[t])))
            y = sum(x[t][j] * w[i][j] for j in range(len(x[t]))) + (delta[i] if delta is not None else 0.0)
            total += (y0 - y) ** 2
    return total


def _col_mean(x, j):
    return sum(x[t][j] for t in range(len(x))) / len(x)


# ----------------------------------------------------------------- EC


@pytest.mark.parametrize("clamp", [(1.0, 2.0), (0.5, 3.0), (1.0, 1e6), (1.2, 1.2)])
@pytest.mark.parametrize("centered", [True, False])
@pytest.mark.parametrize("steps", STEPS)
def test_energy_compensation_matches_reference(steps, centered, clamp):
    w0 = _weight(seed=3)
    mask = _mask(w0, 0.6, seed=4)
    out = energy_compensation(w0, mask, steps, centered, clamp)
    assert out.dtype == torch.float32
    expected = ref_ec(w0.tolist(), mask.tolist(), steps, centered, *clamp)
    _close(out, expected)
    assert (out[~mask] == 0).all()


def test_energy_compensation_default_is_column_then_row_centered_clamp_1_2():
    w0 = _weight(seed=5)
    mask = _mask(w0, seed=6)
    _close(energy_compensation(w0, mask), ref_ec(w0.tolist(), mask.tolist(), "column,row", True, 1.0, 2.0))


def test_order_of_steps_matters_and_each_order_matches_reference():
    w0 = _weight(7, 9, seed=8)
    mask = _mask(w0, 0.7, seed=9)
    clamp = (0.25, 4.0)
    col_row = energy_compensation(w0, mask, "column,row", True, clamp)
    row_col = energy_compensation(w0, mask, "row,column", True, clamp)
    assert not torch.allclose(col_row, row_col, rtol=1e-3, atol=0)
    _close(col_row, ref_ec(w0.tolist(), mask.tolist(), "column,row", True, *clamp))
    _close(row_col, ref_ec(w0.tolist(), mask.tolist(), "row,column", True, *clamp))


def test_column_and_row_scale_factors_match_reference():
    w0 = _weight(seed=10)
    mask = _mask(w0, 0.5, seed=11)
    wp = w0 * mask
    for centered in (True, False):
        for clamp in ((1.0, 2.0), (0.1, 10.0)):
            c = ec_column_scale(w0, wp, centered, clamp)
            r = ec_row_scale(w0, wp, centered, clamp)
            assert c.shape == (w0.shape[1],) and r.shape == (w0.shape[0],)
            _close(c, ref_column_factors(w0.tolist(), wp.tolist(), centered, *clamp))
            _close(r, ref_row_factors(w0.tolist(), wp.tolist(), centered, *clamp))


def test_centering_uses_original_weights_mean():
    """A column of equal weights has zero centered energy: nothing to restore, factor = clamp low."""
    w0 = torch.tensor([[1.0, 0.3], [1.0, -0.2], [1.0, 0.5], [1.0, 0.1]])
    mask = torch.tensor([[True, True], [False, True], [True, False], [False, True]])
    c = ec_column_scale(w0, w0 * mask, centered=True, clamp=(0.5, 2.0))
    assert c[0].item() == pytest.approx(0.5)  # E0 = 0 -> sqrt(0 / E1) = 0, clamped up to 0.5
    c_unc = ec_column_scale(w0, w0 * mask, centered=False, clamp=(0.5, 2.0))
    assert c_unc[0].item() == pytest.approx(math.sqrt(2.0))  # 4 / 2 energy ratio, uncentered


def test_fully_pruned_column_scale_is_neutral_and_stays_zero():
    w0 = _weight(seed=12)
    mask = torch.ones(w0.shape, dtype=torch.bool)
    mask[:, 2] = False
    c = ec_column_scale(w0, w0 * mask, centered=False, clamp=(1.0, 2.0))
    assert c[2].item() == 1.0
    out = energy_compensation(w0, mask, "column,row", centered=False)
    assert (out[:, 2] == 0).all()
    assert torch.isfinite(out).all()


def test_clamp_bounds_are_respected_per_step():
    w0 = _weight(8, 8, seed=13)
    mask = _mask(w0, 0.8, seed=14)
    wp = (w0 * mask).float()
    for lo, hi in ((1.0, 1.5), (0.9, 1.1), (2.0, 3.0)):
        for steps in ("column", "row"):
            out = energy_compensation(w0, mask, steps, True, (lo, hi))
            ratio = out[mask] / wp[mask]
            assert ratio.min() >= lo - 1e-6 and ratio.max() <= hi + 1e-6
        # Unclamped factors at 80% sparsity exceed 1.5, so the upper clamp actually acts.
        unclamped = ec_column_scale(w0, w0 * mask, True, (0.0, math.inf))
        assert unclamped.max() > 1.5
        assert ec_column_scale(w0, w0 * mask, True, (lo, hi)).max() <= hi


def test_unknown_ec_step_raises():
    w0 = _weight()
    with pytest.raises(ValueError, match="diagonal"):
        energy_compensation(w0, _mask(w0), "column,diagonal")


# ----------------------------------------------------------------- activation energy, LSQ, bias, error


@pytest.mark.parametrize("clamp", [(1.0, 2.0), (0.0, math.inf), (1.0, 1.01)])
def test_activation_energy_row_scale_matches_reference(clamp):
    w0 = _weight(seed=15)
    mask = _mask(w0, 0.5, seed=16)
    x = _tokens(40, w0.shape[1], seed=17)
    xl = x.tolist()
    m2 = [sum(xl[t][j] ** 2 for t in range(len(xl))) / len(xl) for j in range(w0.shape[1])]
    s = activation_energy_row_scale(w0, mask, torch.tensor(m2, dtype=torch.float64), clamp)
    _close(s, ref_activation_scale(w0.tolist(), mask.tolist(), m2, *clamp))

    result = compensate(w0, mask, "ec-activation", _stats(x), ec_clamp=clamp)
    expected = [
        [w0[i, j].item() * s[i].item() if mask[i, j] else 0.0 for j in range(w0.shape[1])]
        for i in range(w0.shape[0])
    ]
    _close(result.weight, expected)
    assert result.bias_delta is None


def test_lsq_row_scale_matches_reference_and_minimises_error():
    w0 = _weight(seed=18)
    mask = _mask(w0, 0.6, seed=19)
    wp = w0 * mask
    x = _tokens(30, w0.shape[1], seed=20)
    s = lsq_row_scale(w0, wp, x)
    ref = ref_lsq(w0.tolist(), wp.tolist(), x.tolist())
    _close(s, ref)
    # s_i is the minimiser: moving it either way raises the row's error.
    xl, w0l, wpl = x.tolist(), w0.tolist(), wp.tolist()
    for i in range(w0.shape[0]):

        def row_err(scale, i=i):
            return ref_output_error([w0l[i]], [[scale * v for v in wpl[i]]], xl)

        assert row_err(ref[i]) <= row_err(ref[i] + 1e-3)
        assert row_err(ref[i]) <= row_err(ref[i] - 1e-3)


def test_lsq_scale_can_be_negative_and_empty_rows_get_one():
    w0 = torch.tensor([[1.0, -3.0], [0.5, 0.5]])
    mask = torch.tensor([[True, False], [False, False]])
    x = torch.tensor([[1.0, 1.0], [2.0, 2.0], [-1.0, -1.0]])
    s = lsq_row_scale(w0, w0 * mask, x)
    # Row 0: y0 = x1 - 3 x2 = -2 x1, y = x1 -> s = -2 (not clamped). Row 1: nothing kept -> 1.
    _close(s, [-2.0, 1.0])


def test_bias_shift_matches_reference():
    w0 = _weight(seed=21)
    mask = _mask(w0, 0.5, seed=22)
    x = _tokens(25, w0.shape[1], seed=23, mean=2.0)
    xl = x.tolist()
    mu = [_col_mean(xl, j) for j in range(w0.shape[1])]
    delta = bias_shift(w0, mask, torch.tensor(mu, dtype=torch.float64))
    assert delta.shape == (w0.shape[0],)
    _close(delta, ref_bias(w0.tolist(), mask.tolist(), mu))


def test_bias_shift_restores_output_exactly_for_constant_inputs():
    w0 = _weight(seed=24)
    mask = _mask(w0, 0.5, seed=25)
    x = torch.tensor([[0.7, -1.2, 3.0, 0.0, 2.5, -0.4, 1.1, 0.9]], dtype=torch.float64).repeat(16, 1)
    stats = _stats(x, sample_size=16)
    delta = bias_shift(w0, mask, stats.mean)
    assert output_error(w0, w0 * mask, x) > 1.0
    assert output_error(w0, w0 * mask, x, delta) < 1e-8


def test_output_error_matches_reference():
    w0 = _weight(seed=26)
    mask = _mask(w0, 0.5, seed=27)
    w = (w0 * mask) * 1.3
    x = _tokens(12, w0.shape[1], seed=28)
    delta = torch.linspace(-1, 1, w0.shape[0], dtype=torch.float64)
    for d in (None, delta):
        ref = ref_output_error(w0.tolist(), w.tolist(), x.tolist(), None if d is None else d.tolist())
        assert output_error(w0, w, x, None if d is None else d.float()) == pytest.approx(ref, rel=1e-5)
    assert output_error(w0, w0, x) == 0.0


# ----------------------------------------------------------------- compensate


def _setup(seed: int = 30, n: int = 64, sample: int = 32, mean: float = 0.5):
    w0 = _weight(seed=seed)
    mask = _mask(w0, 0.5, seed=seed + 1)
    x = _tokens(n, w0.shape[1], seed=seed + 2, mean=mean)
    return w0, mask, x, _stats(x, sample_size=sample)


def test_compensate_none():
    w0, mask, _, stats = _setup()
    res = compensate(w0, mask, "none", stats, safety_check=True)
    assert torch.equal(res.weight, (w0 * mask).float())
    assert res.bias_delta is None
    assert res.record["applied"] is False and res.record["kind"] == "none"


@pytest.mark.parametrize("steps", STEPS)
def test_compensate_ec_passes_options_and_records_errors(steps):
    w0, mask, _, stats = _setup()
    res = compensate(w0, mask, "ec", stats, ec_steps=steps, ec_centered=False, ec_clamp=(0.5, 3.0))
    _close(res.weight, ref_ec(w0.tolist(), mask.tolist(), steps, False, 0.5, 3.0))
    sample = stats.sample.tolist()
    assert res.record["kind"] == "ec" and res.record["applied"] is True
    assert res.record["error_none"] == pytest.approx(
        ref_output_error(w0.tolist(), (w0 * mask).tolist(), sample), rel=1e-4
    )
    assert res.record["error_compensated"] == pytest.approx(
        ref_output_error(w0.tolist(), res.weight.tolist(), sample), rel=1e-4
    )


def test_compensate_without_sample_records_no_errors():
    w0, mask, x, _ = _setup()
    for stats in (None, _stats(x, sample_size=0)):
        res = compensate(w0, mask, "ec", stats)
        assert res.record["applied"] is True
        assert "error_none" not in res.record and "error_compensated" not in res.record
        _close(res.weight, ref_ec(w0.tolist(), mask.tolist(), "column,row", True, 1.0, 2.0))


def test_compensate_lsq_fits_on_even_rows_and_is_judged_on_odd_rows():
    w0, mask, _, stats = _setup(sample=24)
    res = compensate(w0, mask, "lsq", stats, safety_check=False)
    wp = (w0 * mask).tolist()
    sample = stats.sample.tolist()
    fit, held_out = sample[0::2], sample[1::2]
    s = ref_lsq(w0.tolist(), wp, fit)
    expected = [[wp[i][j] * s[i] for j in range(w0.shape[1])] for i in range(w0.shape[0])]
    _close(res.weight, expected)
    assert res.record["applied"] is True
    assert res.record["error_none"] == pytest.approx(ref_output_error(w0.tolist(), wp, held_out), rel=1e-4)
    assert res.record["error_compensated"] == pytest.approx(
        ref_output_error(w0.tolist(), expected, held_out), rel=1e-4
    )


def test_lsq_safety_check_can_reject_on_held_out_rows():
    # Odd rows lie in the null space of (w0 - pruned): there the pruned layer is already exact, so any
    # scale fitted on the (ordinary) even rows raises the held-out error and must be refused.
    w0, mask, x, _ = _setup(sample=0)
    diff = w0 - w0 * mask
    null = torch.linalg.svd(diff, full_matrices=True).Vh[diff.shape[0]:]  # [d_in - d_out, d_in]
    rows = [x[k] if k % 2 == 0 else null[(k // 2) % null.shape[0]] * (1 + k) for k in range(16)]
    stats = SimpleNamespace(sample=torch.stack(rows))
    res = compensate(w0, mask, "lsq", stats, safety_check=True)
    assert res.record["error_none"] == pytest.approx(0.0, abs=1e-8)
    assert res.record["error_compensated"] > 1e-6
    assert res.record["applied"] is False
    assert torch.equal(res.weight, (w0 * mask).float())


@pytest.mark.parametrize("kind", ["ec", "ec-activation", "lsq", "bias"])
def test_shrink_moves_the_correction_part_of_the_way(kind):
    w0, mask, _, stats = _setup(mean=2.0)
    full = compensate(w0, mask, kind, stats, has_bias=True)
    half = compensate(w0, mask, kind, stats, has_bias=True, shrink=0.25)
    pruned = (w0 * mask).float()
    _close(half.weight, (pruned + 0.25 * (full.weight - pruned)).tolist())
    assert torch.equal(half.weight != 0, full.weight != 0)  # never revives a weight
    if full.bias_delta is not None:
        _close(half.bias_delta, (0.25 * full.bias_delta).tolist())


def test_safety_check_rejects_a_compensation_that_raises_the_error():
    w0, mask, _, stats = _setup()
    clamp = (3.0, 3.0)  # force every surviving weight up by 9x: certainly worse on this data
    sample = stats.sample.tolist()
    err_none = ref_output_error(w0.tolist(), (w0 * mask).tolist(), sample)
    err_comp = ref_output_error(
        w0.tolist(), ref_ec(w0.tolist(), mask.tolist(), "column,row", True, *clamp), sample
    )
    assert err_comp > err_none

    checked = compensate(w0, mask, "ec", stats, ec_clamp=clamp, safety_check=True)
    assert checked.record["applied"] is False
    assert torch.equal(checked.weight, (w0 * mask).float())
    assert checked.bias_delta is None
    assert checked.record["error_none"] == pytest.approx(err_none, rel=1e-4)
    assert checked.record["error_compensated"] == pytest.approx(err_comp, rel=1e-4)

    unchecked = compensate(w0, mask, "ec", stats, ec_clamp=clamp, safety_check=False)
    assert unchecked.record["applied"] is True
    assert unchecked.record["error_compensated"] == pytest.approx(err_comp, rel=1e-4)
    _close(unchecked.weight, ref_ec(w0.tolist(), mask.tolist(), "column,row", True, *clamp))


def test_safety_check_keeps_a_compensation_that_lowers_the_error():
    w0, mask, x, _ = _setup(mean=3.0)
    stats = _stats(x, sample_size=64)  # the subsample is all tokens: its mean is the stats mean
    res = compensate(w0, mask, "bias", stats, has_bias=True, safety_check=True)
    assert res.record["applied"] is True
    assert res.record["error_compensated"] < res.record["error_none"]
    assert torch.equal(res.weight, (w0 * mask).float())
    xl = x.tolist()
    _close(
        res.bias_delta, ref_bias(w0.tolist(), mask.tolist(), [_col_mean(xl, j) for j in range(w0.shape[1])])
    )
    sample = stats.sample.tolist()
    ref_err = ref_output_error(w0.tolist(), (w0 * mask).tolist(), sample, res.bias_delta.tolist())
    assert res.record["error_compensated"] == pytest.approx(ref_err, rel=1e-4)


def test_safety_check_is_strict_on_equal_error():
    w0, mask, _, stats = _setup()
    # Clamp (1, 1): EC changes nothing, the errors are equal, and "lowers" is not satisfied.
    res = compensate(w0, mask, "ec", stats, ec_clamp=(1.0, 1.0), safety_check=True)
    assert res.record["error_compensated"] == res.record["error_none"]
    assert res.record["applied"] is False


def test_bias_on_layer_without_bias_is_skipped_unless_add_bias():
    w0, mask, x, stats = _setup(mean=2.0)
    skipped = compensate(w0, mask, "bias", stats, has_bias=False)
    assert skipped.bias_delta is None
    assert skipped.record["applied"] is False
    assert "bias" in skipped.record["reason"]
    assert torch.equal(skipped.weight, (w0 * mask).float())

    mu = [_col_mean(x.tolist(), j) for j in range(w0.shape[1])]
    for kwargs in ({"has_bias": False, "add_bias": True}, {"has_bias": True}):
        added = compensate(w0, mask, "bias", stats, **kwargs)
        assert added.record["applied"] is True
        _close(added.bias_delta, ref_bias(w0.tolist(), mask.tolist(), mu))


@pytest.mark.parametrize("kind", ["ec-activation", "lsq", "bias"])
def test_compensation_needing_statistics_raises_without(kind):
    w0 = _weight()
    with pytest.raises(ValueError, match=kind):
        compensate(w0, _mask(w0), kind, None)


def test_lsq_and_safety_check_need_a_subsample():
    w0, mask, x, _ = _setup()
    no_sample = _stats(x, sample_size=0)
    with pytest.raises(ValueError, match="subsample"):
        compensate(w0, mask, "lsq", no_sample)
    with pytest.raises(ValueError, match="subsample"):
        compensate(w0, mask, "ec", no_sample, safety_check=True)
    with pytest.raises(ValueError, match="subsample"):
        compensate(w0, mask, "ec", None, safety_check=True)


def test_unknown_kind_raises():
    w0, mask, _, stats = _setup()
    with pytest.raises(ValueError, match="sparsegpt"):
        compensate(w0, mask, "sparsegpt", stats)


def test_compensate_does_not_modify_inputs():
    w0, mask, _, stats = _setup()
    w_before, m_before = w0.clone(), mask.clone()
    for kind in ("ec", "ec-activation", "lsq", "bias"):
        compensate(w0, mask, kind, stats, safety_check=True)
    assert torch.equal(w0, w_before) and torch.equal(mask, m_before)


# ----------------------------------------------------------------- property: masks survive every compensation


@st.composite
def layer_and_mask(draw):
    m = draw(st.sampled_from([2, 4, 8]))
    n = draw(st.integers(1, m - 1))
    d_in = m * draw(st.integers(1, 3))
    d_out = draw(st.integers(1, 5))
    seed = draw(st.integers(0, 10_000))
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(d_out, d_in, generator=g, dtype=torch.float64) * draw(st.sampled_from([0.01, 1.0, 50.0]))
    scores = torch.rand(d_out, d_in, generator=g)
    if draw(st.booleans()):
        pattern = (n, m)
        mask = nm_mask(scores, n, m)
    else:
        pattern = None
        mask = unstructured_mask(
            scores, draw(st.integers(1, 99)) / 100, draw(st.sampled_from(["row", "layer"]))
        )
    x = torch.randn(draw(st.integers(1, 20)), d_in, generator=g, dtype=torch.float64) + draw(
        st.sampled_from([0.0, 3.0])
    )
    return w0, mask, pattern, x


@FAST
@given(
    case=layer_and_mask(),
    kind=st.sampled_from(["ec", "ec-activation", "lsq", "bias"]),
    steps=st.sampled_from(STEPS),
    centered=st.booleans(),
    clamp=st.sampled_from([(1.0, 2.0), (0.5, 4.0), (1.0, 1e4)]),
    safety=st.booleans(),
)
def test_compensation_never_revives_and_keeps_nm_groups(case, kind, steps, centered, clamp, safety):
    w0, mask, pattern, x = case
    stats = _stats(x, sample_size=16)
    res = compensate(
        w0,
        mask,
        kind,
        stats,
        ec_steps=steps,
        ec_centered=centered,
        ec_clamp=clamp,
        safety_check=safety,
        has_bias=True,
    )
    assert res.weight.shape == w0.shape
    assert torch.isfinite(res.weight).all()
    assert (res.weight[~mask] == 0).all()  # never revives a pruned weight
    nonzero = res.weight != 0
    assert not (nonzero & ~mask).any()
    if pattern is not None:
        n, m = pattern
        per_group = nonzero.reshape(w0.shape[0], -1, m).sum(-1)
        assert (per_group <= n).all()
    if safety and not res.record["applied"]:
        assert torch.equal(res.weight, (w0 * mask).float())
    if safety:
        assert res.record["applied"] == (res.record["error_compensated"] < res.record["error_none"])
    if kind == "ec" and len(steps.split(",")) == 1 and res.record["applied"]:
        # A single EC step scales each kept weight by a factor inside the clamp.
        wp = (w0 * mask).float()
        kept = mask & (wp != 0)
        ratio = res.weight[kept] / wp[kept]
        assert (ratio >= clamp[0] * (1 - 1e-5)).all() and (ratio <= clamp[1] * (1 + 1e-5)).all()


@FAST
@given(case=layer_and_mask(), steps=st.sampled_from(STEPS), centered=st.booleans())
def test_energy_compensation_matches_reference_property(case, steps, centered):
    w0, mask, _, _ = case
    clamp = (0.5, 4.0)
    out = energy_compensation(w0, mask, steps, centered, clamp)
    expected = torch.tensor(ref_ec(w0.tolist(), mask.tolist(), steps, centered, *clamp), dtype=torch.float64)
    scale = w0.abs().max().item()
    torch.testing.assert_close(out.to(torch.float64), expected, rtol=1e-4, atol=1e-5 * scale)


# --------------------------------------------------------------------------- float32 products from half parts


def _weights_and_rows(dtype: torch.dtype, device: str = "cpu"):
    g = torch.Generator().manual_seed(31)
    x = (torch.randn(300, 48, generator=g) * 3).to(dtype).to(device)
    x[:3, 5] = 2000.0  # a massive activation
    d = (torch.randn(24, 48, generator=g, dtype=torch.float64) * 0.02).float().to(device)
    d[:, :10] *= 1e-3  # small differences, as a compensation's scale leaves them
    return x, d


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_times_transpose_splits_into_half_parts_as_accurate_as_float32(dtype, monkeypatch):
    """The half-part product (emulated on the CPU: exact products, rounded to float32) against float64; one
    part alone would be ~1e-3 off, the split is at float32's level."""
    from optimum_statprune.tensor_math import compensation

    calls = []

    def emulated(a, b):
        calls.append(a.dtype)
        return (a.double() @ b.double()).float()

    monkeypatch.setattr(compensation, "half_product", emulated)
    x, d = _weights_and_rows(dtype)
    exact = x.double() @ d.double().T
    got = compensation.times_transpose(x, d)
    assert got.dtype == torch.float32 and len(calls) == compensation._SPLIT[dtype][0]
    error = ((got.double() - exact).norm() / exact.norm()).item()
    one_part = ((emulated(x, d.to(dtype).T).double() - exact).norm() / exact.norm()).item()
    assert error < 1e-6 < one_part


def test_times_transpose_on_a_cpu_is_the_float32_product():
    for dtype in (torch.float16, torch.float32):
        x, d = _weights_and_rows(dtype)
        assert torch.equal(times_transpose(x, d), x.float() @ d.T)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the half-precision product needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_times_transpose_on_a_gpu_matches_float64(dtype):
    x, d = _weights_and_rows(dtype, "cuda")
    exact = x.double() @ d.double().T
    got = times_transpose(x, d)
    assert ((got.double() - exact).norm() / exact.norm()).item() < 1e-6


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind,shrink", [("ec-activation", 1.0), ("ec-activation", 0.5), ("lsq", 1.0)])
def test_row_scale_errors_come_from_two_exact_products(dtype, kind, shrink, monkeypatch):
    """Token rows and weight in one half-precision dtype (the tensor-core product emulated on the CPU):
    the layer check's errors of a row scale come from the pruned and the kept part of the weight, two
    products, and equal the float64 errors of the weights ``compensate`` returns."""
    from optimum_statprune.tensor_math import compensation

    calls = []

    def emulated(a, b):
        calls.append(a.dtype)
        return (a.double() @ b.double()).float()

    monkeypatch.setattr(compensation, "half_product", emulated)
    g = torch.Generator().manual_seed(5)
    w = (torch.randn(24, 48, generator=g) * 0.02).to(dtype)
    x = (torch.randn(300, 48, generator=g) * 3).to(dtype)
    mask = torch.rand(24, 48, generator=g) > 0.5
    stats = ChannelStats(48, sample_size=300)
    stats.update(x)
    result = compensate(w, mask, kind, stats, shrink=shrink)
    judge = (stats.sample[1::2] if kind == "lsq" else stats.sample).double()
    w0 = w.double()
    ref_none = float(((judge @ (w0 - w0 * mask).T) ** 2).sum())
    ref_comp = float(((judge @ (w0 - result.weight.double()).T) ** 2).sum())
    assert result.record["applied"] and ref_comp != ref_none
    assert math.isclose(result.record["error_none"], ref_none, rel_tol=1e-5)
    assert math.isclose(result.record["error_compensated"], ref_comp, rel_tol=1e-5)
    if kind == "ec-activation":
        assert len(calls) == 2  # one product each for the pruned and the kept part, no split


def test_row_scale_errors_need_one_half_precision_dtype():
    x = torch.randn(10, 8, dtype=torch.float16)
    mask = torch.ones(4, 8, dtype=torch.bool)
    assert row_scaled_errors(torch.randn(4, 8), mask, torch.ones(4), x) is None  # float32 weight
    assert row_scaled_errors(torch.randn(4, 8), mask, torch.ones(4), x.float()) is None  # float32 rows

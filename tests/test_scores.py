"""Importance scores against naive references written with explicit loops over i, j in float64."""

from __future__ import annotations

import math

import pytest
import torch

from optimum_statprune import StatPruneConfig
from optimum_statprune.methods import ScoreMethod, get_method
from optimum_statprune.tensor_math.scores import (
    cvr_score,
    magnitude_score,
    ria_score,
    wanda_score,
    weight_dispersion,
)
from optimum_statprune.tensor_math.stats import ChannelStats, LayerStatistics

D_OUT, D_IN, N_TOK = 5, 7, 23


def _weight(seed: int = 0, dtype=torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(D_OUT, D_IN, generator=g, dtype=torch.float64) * 0.2).to(dtype)


def _tokens(seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # Channels with different means and spreads, one of them an "outlier" channel.
    scale = torch.tensor([1.0, 0.1, 5.0, 0.5, 2.0, 30.0, 1.0], dtype=torch.float64)
    shift = torch.tensor([0.0, 1.0, -2.0, 0.3, 0.0, 10.0, 0.0], dtype=torch.float64)
    return torch.randn(N_TOK, D_IN, generator=g, dtype=torch.float64) * scale + shift


def _stats(x: torch.Tensor) -> ChannelStats:
    stats = ChannelStats(x.shape[1])
    stats.update(x)
    return stats


def layer_scores(method: str, w: torch.Tensor, stats: ChannelStats, config) -> torch.Tensor:
    """The registered method's score, fed as the engine feeds it (a LayerStatistics holding ``stats``)."""
    m = get_method(method)
    assert isinstance(m, ScoreMethod)
    layer = LayerStatistics(stats.dim)
    layer.channel = stats
    return m.score(w, layer, config)


# ----------------------------------------------------------------- naive references (lists, loops)


def _col_norm(x: list[list[float]], j: int) -> float:
    return math.sqrt(sum(x[t][j] ** 2 for t in range(len(x))))


def _col_var(x: list[list[float]], j: int) -> float:
    n = len(x)
    mean = sum(x[t][j] for t in range(n)) / n
    return sum((x[t][j] - mean) ** 2 for t in range(n)) / n


def ref_magnitude(w):
    return [[abs(w[i][j]) for j in range(len(w[0]))] for i in range(len(w))]


def ref_wanda(w, x):
    return [[abs(w[i][j]) * _col_norm(x, j) for j in range(len(w[0]))] for i in range(len(w))]


def ref_ria(w, x, power):
    d_out, d_in = len(w), len(w[0])
    out = [[0.0] * d_in for _ in range(d_out)]
    for i in range(d_out):
        row_sum = sum(abs(w[i][k]) for k in range(d_in))
        for j in range(d_in):
            col_sum = sum(abs(w[k][j]) for k in range(d_out))
            rel = 0.0
            if row_sum > 0:
                rel += abs(w[i][j]) / row_sum
            if col_sum > 0:
                rel += abs(w[i][j]) / col_sum
            out[i][j] = rel * _col_norm(x, j) ** power
    return out


def _col_m2(x, j):
    return sum(x[t][j] ** 2 for t in range(len(x))) / len(x)


def ref_cvr(w, x, alpha, eps, axis, stat="variance", power=0.5):
    d_out, d_in = len(w), len(w[0])
    out = [[0.0] * d_in for _ in range(d_out)]
    for i in range(d_out):
        for j in range(d_in):
            # The weight's dispersion group: its input column j, or its output row i.
            group = [w[k][j] for k in range(d_out)] if axis == "column" else [w[i][k] for k in range(d_in)]
            gm = sum(group) / len(group)
            sigma2 = sum((v - gm) ** 2 for v in group) / len(group)
            a = _col_var(x, j) if stat == "variance" else _col_m2(x, j)
            out[i][j] = abs(w[i][j]) * a ** (power / 2) * (sigma2 + eps) ** (-alpha / 2)
    return out


def _close(actual: torch.Tensor, expected, rtol=2e-6):
    assert actual.dtype == torch.float32
    expected = torch.tensor(expected, dtype=torch.float64)
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual.to(torch.float64), expected, rtol=rtol, atol=1e-7)


# ----------------------------------------------------------------- tests


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_magnitude(seed):
    w = _weight(seed)
    _close(magnitude_score(w), ref_magnitude(w.tolist()))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_wanda(seed):
    w, x = _weight(seed), _tokens(seed + 10)
    _close(wanda_score(w, _stats(x)), ref_wanda(w.tolist(), x.tolist()))


@pytest.mark.parametrize("power", [0.5, 1.0, 0.0])
@pytest.mark.parametrize("seed", [0, 1])
def test_ria(seed, power):
    w, x = _weight(seed), _tokens(seed + 10)
    _close(ria_score(w, _stats(x), power), ref_ria(w.tolist(), x.tolist(), power))


def test_ria_default_power_is_one_half():
    w, x = _weight(3), _tokens(4)
    _close(ria_score(w, _stats(x)), ref_ria(w.tolist(), x.tolist(), 0.5))


def test_ria_zero_row_and_column_give_zero_not_nan():
    w = _weight(5)
    w[2, :] = 0.0
    w[:, 4] = 0.0
    x = _tokens(6)
    s = ria_score(w, _stats(x))
    assert torch.isfinite(s).all()
    assert (s[2] == 0).all() and (s[:, 4] == 0).all()
    _close(s, ref_ria(w.tolist(), x.tolist(), 0.5))


@pytest.mark.parametrize("axis", ["column", "row"])
@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0, 2.0])
@pytest.mark.parametrize("eps", [1e-8, 1e-2])
def test_cvr(alpha, eps, axis):
    w, x = _weight(7), _tokens(8)
    _close(
        cvr_score(w, _stats(x), alpha, eps, axis),
        ref_cvr(w.tolist(), x.tolist(), alpha, eps, axis),
        rtol=1e-5,
    )


@pytest.mark.parametrize("stat", ["variance", "second_moment"])
@pytest.mark.parametrize("power", [0.0, 0.5, 1.0, 1.5])
def test_cvr_activation_statistic_and_power(stat, power):
    w, x = _weight(9), _tokens(10)
    _close(
        cvr_score(w, _stats(x), 0.5, 1e-8, "column", stat, power),
        ref_cvr(w.tolist(), x.tolist(), 0.5, 1e-8, "column", stat, power),
        rtol=1e-5,
    )


def test_cvr_second_moment_power_one_alpha_zero_is_wanda_up_to_a_constant():
    w, x = _weight(11), _tokens(12)
    ratio = cvr_score(w, _stats(x), 0.0, 1e-8, "column", "second_moment", 1.0) / wanda_score(w, _stats(x))
    torch.testing.assert_close(ratio, torch.full_like(ratio, 1 / math.sqrt(x.shape[0])), rtol=1e-5, atol=0)


def test_cvr_rejects_an_unknown_activation_statistic():
    with pytest.raises(ValueError, match="activation_stat"):
        cvr_score(_weight(), _stats(_tokens()), activation_stat="mean")


def test_cvr_defaults_are_alpha_one_eps_1e8_column():
    w, x = _weight(9), _tokens(10)
    _close(cvr_score(w, _stats(x)), ref_cvr(w.tolist(), x.tolist(), 1.0, 1e-8, "column"), rtol=1e-5)


def test_cvr_alpha_zero_is_weight_times_sqrt_std():
    w, x = _weight(11), _tokens(12)
    xs = x.tolist()
    expected = [
        [abs(w[i, j].item()) * math.sqrt(math.sqrt(_col_var(xs, j))) for j in range(D_IN)]
        for i in range(D_OUT)
    ]
    _close(cvr_score(w, _stats(x), alpha=0.0), expected)


def test_cvr_ignores_channel_mean_unlike_wanda():
    """Shifting a channel's mean changes ||X_j|| (Wanda) but not Var(x_j) (CVR)."""
    w, x = _weight(13), _tokens(14)
    shifted = x.clone()
    shifted[:, 3] += 100.0
    torch.testing.assert_close(cvr_score(w, _stats(shifted)), cvr_score(w, _stats(x)), rtol=1e-4, atol=0)
    assert not torch.allclose(wanda_score(w, _stats(shifted)), wanda_score(w, _stats(x)))


def test_weight_dispersion_against_loops():
    w = _weight(15)
    wl = w.tolist()
    col = weight_dispersion(w, "column")
    row = weight_dispersion(w, "row")
    assert col.shape == (D_IN,) and row.shape == (D_OUT,)
    for j in range(D_IN):
        vals = [wl[i][j] for i in range(D_OUT)]
        m = sum(vals) / D_OUT
        assert math.isclose(col[j].item(), sum((v - m) ** 2 for v in vals) / D_OUT, rel_tol=1e-5)
    for i in range(D_OUT):
        vals = wl[i]
        m = sum(vals) / D_IN
        assert math.isclose(row[i].item(), sum((v - m) ** 2 for v in vals) / D_IN, rel_tol=1e-5)
    with pytest.raises(ValueError, match="weight_stat_axis"):
        weight_dispersion(w, "diagonal")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_scores_are_float32_for_any_weight_dtype(dtype):
    w = _weight(16, dtype=dtype)
    x = _tokens(17)
    exact = w.to(torch.float64).tolist()  # the weight's rounded values
    _close(magnitude_score(w), ref_magnitude(exact))
    _close(wanda_score(w, _stats(x)), ref_wanda(exact, x.tolist()))
    _close(ria_score(w, _stats(x)), ref_ria(exact, x.tolist(), 0.5))
    _close(cvr_score(w, _stats(x)), ref_cvr(exact, x.tolist(), 1.0, 1e-8, "column"), rtol=1e-5)


def test_scores_do_not_modify_weight():
    w = _weight(18)
    w_before = w.clone()
    stats = _stats(_tokens(19))
    for fn in (
        magnitude_score,
        lambda t: wanda_score(t, stats),
        lambda t: ria_score(t, stats),
        lambda t: cvr_score(t, stats),
    ):
        fn(w)
    assert torch.equal(w, w_before)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "ria", "cvr", "statprune"])
def test_layer_scores_dispatch(method):
    w, x = _weight(20), _tokens(21)
    cfg = StatPruneConfig(method=method, alpha=0.7, eps=1e-3, weight_stat_axis="row", ria_power=0.8,
                          activation_stat="second_moment", activation_power=0.8)
    wl, xl = w.tolist(), x.tolist()
    expected = {
        "magnitude": ref_magnitude(wl),
        "wanda": ref_wanda(wl, xl),
        "ria": ref_ria(wl, xl, 0.8),
        "cvr": ref_cvr(wl, xl, 0.7, 1e-3, "row", "second_moment", 0.8),
        "statprune": ref_cvr(wl, xl, 0.7, 1e-3, "row", "second_moment", 0.8),
    }[method]
    _close(layer_scores(method, w, _stats(x), cfg), expected, rtol=1e-5)


def test_cvr_method_defaults_are_the_papers_formula():
    w, x = _weight(22), _tokens(23)
    _close(layer_scores("cvr", w, _stats(x), StatPruneConfig(method="cvr")),
           ref_cvr(w.tolist(), x.tolist(), 1.0, 1e-8, "column", "variance", 0.5), rtol=1e-5)


def test_activation_scores_refuse_missing_statistics():
    for method in ("wanda", "ria", "cvr", "statprune"):
        with pytest.raises(ValueError, match=f"{method} needs per-channel activation statistics"):
            get_method(method).score(_weight(), None, StatPruneConfig(method=method))


def test_outlier_channel_is_damped_by_cvr_relative_to_wanda():
    """Var(x)^(1/4) grows slower than ||X||: the outlier channel's share of the score falls."""
    w = torch.ones(D_OUT, D_IN, dtype=torch.float64)
    w[0, 0] = 2.0  # make the column dispersions non-zero and equal
    w[0, 1:] = 2.0
    x = _tokens(22)
    stats = _stats(x)
    wanda = wanda_score(w, stats)[1]
    cvr = cvr_score(w, stats, alpha=0.0)[1]
    outlier, normal = 5, 0
    assert cvr[outlier] / cvr[normal] < wanda[outlier] / wanda[normal]

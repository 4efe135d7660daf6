"""SparseGPT: the blocked, lazy-update sweep against a naive float64 OBS reference; exact counts; retries;
the Hessian accumulator's batch-split invariance and merging."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from optimum_statprune.tensor_math.masks import prune_count, unstructured_mask
from optimum_statprune.tensor_math.sparsegpt import HessianAccumulator, sparsegpt_prune

FAST = settings(max_examples=25, deadline=None)


def _inputs(n: int, d_in: int, seed: int, outliers: int = 2) -> torch.Tensor:
    """Correlated tokens with a few large-magnitude channels and a non-zero mean, like LLM activations."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(d_in) + 2 * torch.randn(d_in, d_in, generator=g) / math.sqrt(d_in)
    x = torch.randn(n, d_in, generator=g) @ mix + 0.3 * torch.randn(d_in, generator=g)
    x[:, torch.randperm(d_in, generator=g)[:outliers]] *= 20
    return x


def _weight(d_out: int, d_in: int, seed: int) -> torch.Tensor:
    return torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(seed + 1000)) * 0.02


def _hessian(x: torch.Tensor) -> torch.Tensor:
    acc = HessianAccumulator(x.shape[-1], dtype=torch.float64)
    acc.update(x)
    return acc.hessian().float()


def _recon_error(w0: torch.Tensor, w: torch.Tensor, x: torch.Tensor) -> float:
    """Relative output error ||W0 X - W X||^2 / ||W0 X||^2 on the calibration tokens."""
    x = x.double()
    return float((x @ (w0.double() - w.double()).T).square().sum() / (x @ w0.double().T).square().sum())


# --------------------------------------------------------------------------- naive reference


def reference_sparsegpt(
    w: torch.Tensor,
    h: torch.Tensor,
    sparsity: float,
    pattern: str = "unstructured",
    blocksize: int = 128,
    percdamp: float = 0.01,
    group: str = "row",
    allocation: str = "even",
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Unblocked OBS in float64, one column at a time, with explicit inverses (no Cholesky trick).

    Processing column q with F = {q, ..., d_in-1} still free: the classical OBS step for pruning w_q is
    ``w_F -= w_q / [H_F^-1]_qq * [H_F^-1]_q,:``; a kept column changes nothing. Masks are chosen by the
    rules the implementation documents, from the fully updated weights: unstructured at the start of
    each ``blocksize`` block (saliency ``w_c^2 / [H_{c..}^-1]_cc``), N:M at the first column of a group.
    Ties: lower index (row-major for layer groups) first. Returns (weight, keep mask, OBS loss)."""
    w = w.double().clone()
    h = h.double().clone()
    d_out, d_in = w.shape
    dead = h.diagonal() == 0
    h.diagonal()[dead] = 1.0
    w[:, dead] = 0.0
    h.diagonal().add_(percdamp * float(h.diagonal().mean()))
    trailing = [torch.linalg.inv(h[c:, c:]) for c in range(d_in)]
    u2 = [float(t[0, 0]) for t in trailing]  # [H_{c..}^-1]_cc, the square of the Cholesky diagonal
    pruned = [[False] * d_in for _ in range(d_out)]
    left_row = [prune_count(d_in, sparsity)] * d_out
    left_layer = prune_count(d_out * d_in, sparsity)
    nm = None if pattern == "unstructured" else tuple(int(v) for v in pattern.split(":"))
    loss = 0.0

    def sal(r: int, c: int) -> float:
        return float(w[r, c]) ** 2 / u2[c]

    for q in range(d_in):
        if nm is None and q % blocksize == 0:
            i1, i2 = q, min(q + blocksize, d_in)
            if group == "row":
                for r in range(d_out):
                    cols = range(i1, d_in) if allocation == "lookahead" else range(i1, i2)
                    k = (
                        left_row[r]
                        if allocation == "lookahead"
                        else (prune_count(i2, sparsity) - prune_count(i1, sparsity))
                    )
                    for c in sorted(cols, key=lambda c, r=r: (sal(r, c), c))[:k]:
                        if c < i2:
                            pruned[r][c] = True
                            left_row[r] -= 1
            else:
                cols = range(i1, d_in) if allocation == "lookahead" else range(i1, i2)
                k = (
                    left_layer
                    if allocation == "lookahead"
                    else (prune_count(d_out * i2, sparsity) - prune_count(d_out * i1, sparsity))
                )
                cells = sorted(((r, c) for r in range(d_out) for c in cols), key=lambda rc: (sal(*rc), *rc))
                for r, c in cells[:k]:
                    if c < i2:
                        pruned[r][c] = True
                        left_layer -= 1
        if nm is not None and q % nm[1] == 0:
            for r in range(d_out):
                for c in sorted(range(q, q + nm[1]), key=lambda c, r=r: (sal(r, c), c))[: nm[1] - nm[0]]:
                    pruned[r][c] = True
        for r in range(d_out):  # one row at a time
            if pruned[r][q]:
                e = float(w[r, q]) / u2[q]
                loss += float(w[r, q]) ** 2 / u2[q] / 2
                w[r, q:] -= e * trailing[q][0]
                w[r, q] = 0.0
    return w, ~torch.tensor(pruned), loss


CASES = [
    # (d_out, d_in, sparsity, pattern, blocksize, group, allocation)
    (5, 24, 0.5, "unstructured", 8, "row", "even"),
    (5, 24, 0.5, "unstructured", 8, "row", "lookahead"),
    (4, 21, 0.6, "unstructured", 8, "layer", "even"),
    (4, 21, 0.6, "unstructured", 8, "layer", "lookahead"),
    (3, 19, 0.3, "unstructured", 128, "row", "even"),  # a single (partial) block; odd width
    (4, 24, 0.0, "2:4", 8, "row", "even"),
    (4, 24, 0.0, "4:8", 16, "row", "even"),
    (3, 12, 0.0, "1:3", 6, "row", "even"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v) for v in c))
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("sweep", ["columns", "solve"])
def test_matches_naive_float64_reference(case, seed, sweep):
    d_out, d_in, sparsity, pattern, blocksize, group, allocation = case
    w = _weight(d_out, d_in, seed)
    h = _hessian(_inputs(8 * d_in, d_in, seed))
    got = sparsegpt_prune(w, h, sparsity, pattern, blocksize=blocksize, group=group, allocation=allocation,
                          sweep=sweep)
    ref_w, ref_mask, ref_loss = reference_sparsegpt(
        w, h, sparsity, pattern, blocksize, 0.01, group, allocation
    )
    assert torch.equal(got.mask, ref_mask)
    torch.testing.assert_close(got.weight.double(), ref_w, rtol=1e-3, atol=1e-5)
    assert got.error == pytest.approx(ref_loss, rel=1e-3)
    assert got.retries == 0 and got.percdamp == 0.01
    assert got.damp == pytest.approx(0.01 * float(h.diagonal().mean()), rel=1e-6)


def test_dead_inputs_are_zeroed_and_pruned_first():
    """An input that never fires (H_jj == 0): its weights are zeroed and, with zero saliency, pruned first."""
    x = _inputs(200, 16, 3)
    x[:, [2, 9]] = 0.0
    w = _weight(4, 16, 3)
    h = _hessian(x)
    got = sparsegpt_prune(w, h, 0.25, blocksize=8)
    ref_w, ref_mask, _ = reference_sparsegpt(w, h, 0.25, blocksize=8)
    assert torch.equal(got.mask, ref_mask)
    assert not got.mask[:, [2, 9]].any()
    torch.testing.assert_close(got.weight.double(), ref_w, rtol=1e-3, atol=1e-5)
    # At 1/16 the first block's share is floor(8/16) = 0: dead input 2 stays in the mask, with a zero weight.
    low = sparsegpt_prune(w, h, 1 / 16, blocksize=8)
    assert low.mask[:, 2].all() and not low.mask[:, 9].any()
    assert (low.weight[:, [2, 9]] == 0).all()


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_error_is_the_dampened_quadratic_form_of_the_change(pattern):
    """The summed OBS losses equal 1/2 sum_rows dw (H + damp I) dw^T: no step's loss is lost."""
    x, w = _inputs(500, 32, 6), _weight(8, 32, 6)
    h = _hessian(x)
    got = sparsegpt_prune(w, h, 0.5, pattern, blocksize=8)
    dw = (w - got.weight).double()
    hd = h.double() + got.damp * torch.eye(32, dtype=torch.float64)
    assert got.error == pytest.approx(0.5 * float(torch.einsum("ri,ij,rj->", dw, hd, dw)), rel=1e-4)


def test_zero_sparsity_changes_nothing():
    w = _weight(6, 20, 4)
    got = sparsegpt_prune(w, _hessian(_inputs(100, 20, 4)), 0.0)
    assert got.mask.all() and torch.equal(got.weight, w) and got.error == 0.0


# --------------------------------------------------------------------------- exact counts


@given(
    d_out=st.integers(1, 6),
    d_in=st.integers(1, 40),
    sparsity=st.integers(0, 100).map(lambda p: p / 100),
    blocksize=st.sampled_from([1, 3, 8, 128]),
    group=st.sampled_from(["row", "layer"]),
    allocation=st.sampled_from(["even", "lookahead"]),
    sweep=st.sampled_from(["columns", "solve"]),
    seed=st.integers(0, 2**16),
)
@FAST
def test_unstructured_counts_are_exact(d_out, d_in, sparsity, blocksize, group, allocation, sweep, seed):
    w = _weight(d_out, d_in, seed)
    h = _hessian(_inputs(3 * d_in + 2, d_in, seed, outliers=min(2, d_in)))
    got = sparsegpt_prune(w, h, sparsity, blocksize=blocksize, group=group, allocation=allocation, sweep=sweep)
    pruned = ~got.mask
    if group == "row":
        assert pruned.sum(1).tolist() == [prune_count(d_in, sparsity)] * d_out
    else:
        assert int(pruned.sum()) == prune_count(d_out * d_in, sparsity)
    if allocation == "even":  # every block gets its share of the budget, exactly
        for i1 in range(0, d_in, blocksize):
            i2 = min(i1 + blocksize, d_in)
            share = pruned[:, i1:i2]
            if group == "row":
                assert (
                    share.sum(1).tolist() == [prune_count(i2, sparsity) - prune_count(i1, sparsity)] * d_out
                )
            else:
                assert int(share.sum()) == prune_count(d_out * i2, sparsity) - prune_count(
                    d_out * i1, sparsity
                )
    assert got.weight.dtype == torch.float32 and bool(torch.isfinite(got.weight).all())
    assert (got.weight[pruned] == 0).all()


@given(
    nm=st.sampled_from([(1, 2), (2, 4), (1, 4), (3, 4), (4, 8)]),
    d_out=st.integers(1, 5),
    groups=st.integers(1, 8),
    blocks=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
@FAST
def test_nm_counts_are_exact(nm, d_out, groups, blocks, seed):
    n, m = nm
    d_in = groups * m
    w = _weight(d_out, d_in, seed)
    got = sparsegpt_prune(w, _hessian(_inputs(3 * d_in, d_in, seed)), 0.5, f"{n}:{m}", blocksize=blocks * m)
    kept = got.mask.reshape(d_out, groups, m).sum(-1)
    assert (kept == n).all()
    assert (got.weight[~got.mask] == 0).all()


def test_odd_width_half_prunes_floor():
    """50% of a row of width 5 prunes exactly 2, in every row; per layer 50% of 3x5 prunes 7."""
    w, h = _weight(3, 5, 0), _hessian(_inputs(50, 5, 0, outliers=1))
    assert (~sparsegpt_prune(w, h, 0.5).mask).sum(1).tolist() == [2, 2, 2]
    assert int((~sparsegpt_prune(w, h, 0.5, group="layer").mask).sum()) == 7


# --------------------------------------------------------------------------- quality


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
def test_lower_output_error_than_magnitude_and_wanda(pattern):
    d_out, d_in = 64, 128
    x = _inputs(1024, d_in, 7, outliers=4)
    w = _weight(d_out, d_in, 7)
    h = _hessian(x)
    sparsity = 0.5

    def baseline(scores: torch.Tensor) -> torch.Tensor:
        if pattern == "unstructured":
            return w * unstructured_mask(scores, sparsity)
        keep = torch.zeros(d_out, d_in // 4, 4, dtype=torch.bool)
        keep.scatter_(-1, scores.reshape(d_out, -1, 4).topk(2, dim=-1).indices, True)
        return w * keep.reshape(d_out, d_in)

    magnitude = _recon_error(w, baseline(w.abs()), x)
    wanda = _recon_error(w, baseline(w.abs() * x.norm(dim=0)), x)
    for group in ("row", "layer"):
        for allocation in ("even", "lookahead"):
            got = sparsegpt_prune(w, h, sparsity, pattern, group=group, allocation=allocation)
            err = _recon_error(w, got.weight, x)
            assert err < 0.85 * wanda < magnitude, (group, allocation, err, wanda, magnitude)


def test_lookahead_allocation_measured_lower_error_than_even():
    """A measurement, pinned: on correlated inputs, spending each row's budget by look-ahead saliency
    (more pruning in early columns, which later columns can compensate) beats an even split per block."""
    d_out, d_in = 64, 256
    x, w = _inputs(2048, d_in, 11, outliers=4), _weight(d_out, d_in, 11)
    h = _hessian(x)
    even = sparsegpt_prune(w, h, 0.5, blocksize=32, allocation="even")
    ahead = sparsegpt_prune(w, h, 0.5, blocksize=32, allocation="lookahead")
    assert _recon_error(w, ahead.weight, x) < _recon_error(w, even.weight, x)
    per_block = (~ahead.mask).reshape(d_out, -1, 32).sum((0, 2))
    assert per_block[0] > per_block[-1]


# --------------------------------------------------------------------------- retries and precision


def test_singular_hessian_retries_with_more_dampening():
    """All channels identical (rank one): with no dampening the Cholesky factorisation fails."""
    d_in = 8
    x = torch.ones(16, 1) * torch.randn(16, 1, generator=torch.Generator().manual_seed(0)).abs().add(0.5)
    h = _hessian(x.expand(16, d_in).contiguous())
    assert torch.linalg.cholesky_ex(h)[1].item() != 0
    got = sparsegpt_prune(_weight(4, d_in, 0), h, 0.5, percdamp=0.0)
    assert got.retries == 1 and got.percdamp == pytest.approx(1e-4)
    assert got.damp == pytest.approx(1e-4 * float(h.diagonal().mean()))
    assert bool(torch.isfinite(got.weight).all())
    assert (~got.mask).sum(1).tolist() == [4] * 4


def test_rank_deficient_inputs_with_tiny_damp_retry_tenfold():
    x = _inputs(6, 32, 5)  # 6 tokens for 32 channels: H has rank 6
    h = _hessian(x)
    got = sparsegpt_prune(_weight(8, 32, 5), h, 0.5, percdamp=1e-9, max_retries=8)
    assert got.retries >= 1
    assert got.percdamp == pytest.approx(1e-9 * 10**got.retries)
    assert bool(torch.isfinite(got.weight).all())
    assert (~got.mask).sum(1).tolist() == [16] * 8
    assert (got.weight[~got.mask] == 0).all()


def test_gives_up_after_max_retries():
    with pytest.raises(torch.linalg.LinAlgError, match="retries"):
        sparsegpt_prune(_weight(2, 4, 0), torch.ones(4, 4), 0.5, percdamp=0.0, max_retries=0)


def test_non_finite_hessian_or_weight_is_rejected():
    h = torch.eye(4)
    h[1, 2] = float("nan")
    with pytest.raises(ValueError, match="H has non-finite"):
        sparsegpt_prune(_weight(2, 4, 0), h, 0.5)
    w = _weight(2, 4, 0)
    w[0, 0] = float("inf")
    with pytest.raises(ValueError, match="weight has non-finite"):
        sparsegpt_prune(w, torch.eye(4), 0.5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights_are_processed_in_float32(dtype):
    w = _weight(8, 32, 2).to(dtype)
    h = _hessian(_inputs(256, 32, 2))
    got = sparsegpt_prune(w, h, 0.5)
    same = sparsegpt_prune(w.float(), h.double(), 0.5)  # H in float64 is also taken in float32
    assert got.weight.dtype == torch.float32
    assert torch.equal(got.weight, same.weight) and torch.equal(got.mask, same.mask)
    assert w.dtype == dtype  # the input is not modified
    # The float32 result differs from what a half-precision sweep would round to.
    assert not torch.equal(got.weight, got.weight.to(dtype).float())


def test_input_weight_is_not_modified():
    w = _weight(4, 16, 0)
    before = w.clone()
    sparsegpt_prune(w, _hessian(_inputs(64, 16, 0)), 0.5)
    assert torch.equal(w, before)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_input_hessian_is_not_modified(dtype):
    """Dead inputs make the pruner change H's diagonal: on its own copy, whether or not a cast made one."""
    x = _inputs(64, 16, 0)
    x[:, 3] = 0  # a dead input
    h = _hessian(x).to(dtype)
    before = h.clone()
    sparsegpt_prune(_weight(4, 16, 0), h, 0.5)
    assert torch.equal(h, before)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"pattern": "2-4"}, "N:M"),
        ({"pattern": "4:2"}, "0 < N < M"),
        ({"pattern": "2:3"}, "multiple of 3"),
        ({"pattern": "2:4", "blocksize": 6}, "blocksize"),
        ({"group": "column"}, "group"),
        ({"allocation": "greedy"}, "allocation"),
        ({"sweep": "fused"}, "sweep"),
        ({"sparsity": 1.5}, "sparsity"),
        ({"percdamp": -0.1}, "percdamp"),
        ({"blocksize": 0}, "blocksize"),
    ],
)
def test_invalid_arguments(kwargs, message):
    args = {"sparsity": 0.5, **kwargs}
    with pytest.raises(ValueError, match=message):
        sparsegpt_prune(_weight(2, 8, 0), torch.eye(8), **args)


def test_block_errors_are_the_column_by_column_substitution():
    """The batched triangular solve gives, row by row, the errors of the loop it replaces, written here as
    the plain float64 recurrence e_i = drop_i (w_i - sum_{j<i} e_j U_ji) / U_ii over a block whose rows
    drop different numbers of columns (as lookahead and per-layer budgets do)."""
    from optimum_statprune.tensor_math.sparsegpt import _block_errors

    gen = torch.Generator().manual_seed(3)
    rows, count = 7, 12
    a = torch.randn(count, count, generator=gen, dtype=torch.float64)
    u = torch.linalg.cholesky(torch.linalg.inv(a @ a.T + count * torch.eye(count, dtype=torch.float64)), upper=True)
    w = torch.randn(rows, count, generator=gen, dtype=torch.float64)
    drop = torch.rand(rows, count, generator=gen) < torch.linspace(0.0, 1.0, rows).unsqueeze(1)  # 0 .. all dropped
    ref = torch.zeros(rows, count, dtype=torch.float64)
    for r in range(rows):
        for i in range(count):
            if drop[r, i]:
                ref[r, i] = (w[r, i] - sum(ref[r, j] * u[j, i] for j in range(i))) / u[i, i]
    got = _block_errors(w.float(), u.float(), drop).double()
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    assert (got[~drop] == 0).all()


def test_solve_sweep_agrees_with_column_sweep_on_a_larger_layer():
    """Same masks, weights equal up to float32 rounding, for both budgets and allocations."""
    w = _weight(48, 256, 5)
    h = _hessian(_inputs(1024, 256, 5))
    for group in ("row", "layer"):
        for allocation in ("even", "lookahead"):
            cols = sparsegpt_prune(w, h, 0.5, group=group, allocation=allocation, blocksize=32)
            solve = sparsegpt_prune(w, h, 0.5, group=group, allocation=allocation, blocksize=32, sweep="solve")
            assert torch.equal(cols.mask, solve.mask), (group, allocation)
            torch.testing.assert_close(solve.weight, cols.weight, rtol=1e-4, atol=1e-5)
            assert solve.error == pytest.approx(cols.error, rel=1e-4)


def test_shape_mismatch():
    with pytest.raises(ValueError, match="H must be"):
        sparsegpt_prune(_weight(2, 8, 0), torch.eye(7), 0.5)


# --------------------------------------------------------------------------- Hessian accumulator


def test_hessian_is_two_over_n_xtx():
    x = _inputs(50, 6, 0).double()
    acc = HessianAccumulator(6, dtype=torch.float64)
    acc.update(x)
    assert acc.count == 50
    torch.testing.assert_close(acc.hessian(), 2 / 50 * x.T @ x)


@pytest.mark.parametrize(("dtype", "rtol"), [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@given(cuts=st.lists(st.integers(1, 119), max_size=6), seed=st.integers(0, 100))
@FAST
def test_hessian_independent_of_batch_split(dtype, rtol, cuts, seed):
    x = _inputs(120, 10, seed)
    whole = HessianAccumulator(10, dtype=dtype)
    whole.update(x)
    split = HessianAccumulator(10, dtype=dtype)
    bounds = [0, *sorted(set(cuts)), 120]
    for a, b in zip(bounds, bounds[1:], strict=False):
        split.update(x[a:b])
    assert split.count == whole.count == 120
    scale = float(whole.hessian().abs().max())  # float32 off-diagonal sums can cancel to near zero
    torch.testing.assert_close(split.hessian(), whole.hessian(), rtol=rtol, atol=rtol * scale)


def test_hessian_merge_and_padding_mask():
    x = _inputs(2 * 7, 5, 1).reshape(2, 7, 5).half()  # half inputs are accumulated in float32
    mask = torch.tensor([[True] * 7, [True] * 4 + [False] * 3])
    a, b, whole = HessianAccumulator(5), HessianAccumulator(5), HessianAccumulator(5)
    a.update(x[:1], mask[:1])
    b.update(x[1:], mask[1:])
    whole.update(x[mask])
    assert a.merge(b) is a
    assert a.count == whole.count == 11
    torch.testing.assert_close(a.hessian(), whole.hessian(), rtol=1e-6, atol=0)
    assert a.hessian().dtype == torch.float32
    rows = x[mask].double()
    torch.testing.assert_close(a.hessian().double(), 2 / 11 * rows.T @ rows, rtol=1e-5, atol=1e-6)


def test_hessian_accumulator_errors():
    acc = HessianAccumulator(4)
    with pytest.raises(ValueError, match="no calibration tokens"):
        acc.hessian()
    with pytest.raises(ValueError, match="4 channels"):
        acc.update(torch.zeros(3, 5))
    acc.update(torch.zeros(0, 4))
    assert acc.count == 0
    with pytest.raises(ValueError, match="merge"):
        acc.merge(HessianAccumulator(3))
    with pytest.raises(ValueError, match="float32 or float64"):
        HessianAccumulator(4, dtype=torch.float16)

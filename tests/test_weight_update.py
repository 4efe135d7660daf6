"""The ADMM weight update against a naive reference: exact masked least squares per row (float64 lstsq).

Tolerances, and why:
- fixed mask, 300 iterations, fp32: relative weight error <= 1e-4 against the float64 lstsq solution.
  ADMM converges linearly (measured: 8e-3 after 20, 7e-5 after 50, 6e-7 after 100 iterations on these
  inputs); 1e-4 leaves room for fp32 round-off amplified by the conditioning of the scaled Gram.
- 20 iterations (the default): the output error is within 2% of the exact optimum and always below the
  mask-only weights' error (the point of the update).
- Gram in float32 from fp16 inputs: relative error <= 1e-5 against float64 (fp16 inputs are exact in
  fp32; only fp32 summation rounding remains).
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from optimum_statprune.tensor_math.masks import make_mask, prune_count
from optimum_statprune.tensor_math.stats import GramAccumulator
from optimum_statprune.tensor_math.weight_update import (
    GradualMask,
    masked_reconstruction,
    nm_groups_intact,
    output_error,
    row_counts_exact,
)


def _inputs(n: int, d_in: int, seed: int, corr: float = 0.5) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(d_in, dtype=torch.float64) + corr * torch.randn(d_in, d_in, generator=g, dtype=torch.float64)
    scale = torch.exp(torch.randn(d_in, generator=g, dtype=torch.float64))  # channels of unequal energy
    return (torch.randn(n, d_in, generator=g, dtype=torch.float64) @ mix) * scale


def reference(w0: torch.Tensor, mask: torch.Tensor, x: torch.Tensor, damp: float) -> torch.Tensor:
    """Exact solution of min ||X (w0 - w)||^2 + lam sum_j G_jj (w0_j - w_j)^2 over w supported on the row's
    mask, row by row, by float64 ``lstsq`` on the stacked design ``[X; diag(sqrt(lam G_jj))]``. ``lam`` is
    ``damp`` times the mean diagonal of the column-normalised Gram (1 where every input fires)."""
    x = x.to(torch.float64)
    w0 = w0.to(torch.float64)
    gdiag = (x * x).sum(0)
    design = torch.cat([x, torch.diag((damp * gdiag).sqrt())])
    out = torch.zeros_like(w0)
    for i in range(w0.shape[0]):
        keep = mask[i]
        if keep.any():
            target = design @ w0[i]
            out[i, keep] = torch.linalg.lstsq(design[:, keep], target[:, None]).solution[:, 0]
    return out


@pytest.mark.parametrize("pattern", ["unstructured", "2:4"])
@pytest.mark.parametrize("damp", [0.1, 0.01])
def test_converges_to_exact_masked_least_squares(pattern, damp):
    x = _inputs(300, 32, seed=1)
    w0 = torch.randn(8, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    mask = make_mask(w0.abs() * x.norm(dim=0), 0.5, pattern)
    exact = reference(w0, mask, x, damp)
    result = masked_reconstruction(w0.float(), mask, (x.T @ x).float(), damp=damp, iters=300 if damp >= 0.1 else 2000)
    rel = float((result.weight.double() - exact).norm() / exact.norm())
    assert rel <= 1e-4, rel
    assert torch.equal(result.mask, mask)
    assert result.retries == 0


def test_twenty_iterations_lower_the_output_error_near_the_optimum():
    x = _inputs(400, 48, seed=3)
    gram = x.T @ x
    w0 = torch.randn(16, 48, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    mask = make_mask(w0.abs() * x.norm(dim=0), 0.5, "unstructured")
    result = masked_reconstruction(w0.float(), mask, gram.float(), damp=0.1, iters=20)
    exact = reference(w0, mask, x, 0.1)
    best = output_error(w0, exact, gram)
    assert result.error < result.error_mask
    assert result.error <= best * 1.02, (result.error, best)
    assert math.isclose(result.error_mask, output_error(w0, w0 * mask, gram), rel_tol=1e-4)


def test_lowers_the_error_of_every_layer_shaped_case_against_mask_only():
    for seed, (d_out, d_in, pattern) in enumerate([(5, 8, "2:4"), (12, 40, "4:8"), (7, 33, "unstructured")]):
        x = _inputs(200, d_in, seed=10 + seed)
        w0 = torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        mask = make_mask(w0.abs() * x.norm(dim=0), 0.6, pattern)
        r = masked_reconstruction(w0.float(), mask, (x.T @ x).float())
        assert r.error < r.error_mask


@settings(max_examples=40, deadline=None)
@given(
    d_out=st.integers(1, 9),
    groups=st.integers(1, 6),
    nm=st.sampled_from([(1, 2), (2, 4), (4, 8), (1, 4), (3, 4)]),
    seed=st.integers(0, 10_000),
    gradual=st.booleans(),
    iters=st.integers(0, 12),
)
def test_nm_groups_never_broken_and_pruned_weights_never_revived(d_out, groups, nm, seed, gradual, iters):
    n, m = nm
    d_in = groups * m
    x = _inputs(3 * d_in + 5, d_in, seed)
    w0 = torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(seed + 1))
    mask = make_mask(w0.abs(), 0.5, f"{n}:{m}")
    schedule = GradualMask(0.5, f"{n}:{m}", steps=max(1, iters // 2)) if gradual else None
    r = masked_reconstruction(w0, mask, (x.T @ x).float(), iters=iters, mask_schedule=schedule)
    assert nm_groups_intact(r.mask, n, m)
    assert bool((r.weight[~r.mask] == 0).all())  # nothing outside the (final) mask
    if not gradual:
        assert torch.equal(r.mask, mask)  # the mask is held fixed: nothing pruned comes back
    assert bool(torch.isfinite(r.weight).all())


@settings(max_examples=40, deadline=None)
@given(
    d_out=st.integers(1, 8),
    d_in=st.integers(2, 37),
    sparsity=st.floats(0.05, 0.95),
    steps=st.integers(1, 10),
    group=st.sampled_from(["row", "layer"]),
    seed=st.integers(0, 10_000),
)
def test_gradual_mask_keeps_exact_counts(d_out, d_in, sparsity, steps, group, seed):
    x = _inputs(2 * d_in + 3, d_in, seed)
    w0 = torch.randn(d_out, d_in, generator=torch.Generator().manual_seed(seed + 1))
    mask = make_mask(w0.abs(), sparsity, "unstructured", group)
    schedule = GradualMask(sparsity, "unstructured", group, steps=steps)
    r = masked_reconstruction(w0, mask, (x.T @ x).float(), iters=steps + 2, mask_schedule=schedule)
    if group == "row":
        assert row_counts_exact(r.mask, sparsity)
    else:
        assert int((~r.mask).sum()) == prune_count(d_out * d_in, sparsity)
    assert bool((r.weight[~r.mask] == 0).all())
    # the schedule rises to the target exactly at its last step
    assert schedule.sparsity_at(steps - 1) == pytest.approx(sparsity)
    assert all(schedule.sparsity_at(t) <= schedule.sparsity_at(t + 1) + 1e-12 for t in range(steps))


def test_gradual_nm_improves_on_a_poor_fixed_mask():
    """Starting from the magnitude mask, re-choosing it in the scaled space ends with a lower error."""
    x = _inputs(400, 64, seed=5, corr=0.3)
    gram = (x.T @ x).float()
    w0 = torch.randn(32, 64, generator=torch.Generator().manual_seed(6))
    mask = make_mask(w0.abs(), 0.5, "2:4")
    fixed = masked_reconstruction(w0, mask, gram, iters=20)
    gradual = masked_reconstruction(w0, mask, gram, iters=20, mask_schedule=GradualMask(0.5, "2:4", steps=15))
    assert gradual.error < fixed.error


def test_retries_with_more_damping_and_records_them():
    w0 = torch.tensor([[1.0, -2.0], [0.5, 0.25]])
    mask = torch.tensor([[True, True], [True, False]])
    indefinite = torch.tensor([[1.0, 5.0], [5.0, 1.0]])  # eigenvalues 6, -4: needs damping > 3
    r = masked_reconstruction(w0, mask, indefinite, damp=0.1, rho=1.0, iters=5)
    assert r.retries == 2 and r.damp == pytest.approx(10.0)
    assert bool(torch.isfinite(r.weight).all())
    with pytest.raises(torch.linalg.LinAlgError):
        masked_reconstruction(w0, mask, indefinite, damp=0.1, iters=5, max_retries=1)
    with pytest.raises(ValueError):
        masked_reconstruction(w0, mask, torch.full((2, 2), float("nan")))


def test_dead_inputs_keep_their_weights_and_half_weights_give_fp32():
    x = _inputs(100, 8, seed=7)
    x[:, 3] = 0.0
    w0 = torch.randn(4, 8).half()
    mask = make_mask(w0.float().abs(), 0.5, "unstructured")
    r = masked_reconstruction(w0, mask, (x.T @ x).float())
    assert r.weight.dtype == torch.float32
    torch.testing.assert_close(r.weight[:, 3], w0.float()[:, 3] * mask[:, 3])
    assert r.error < r.error_mask


# ---------------------------------------------------------------------------------------------- Gram
def test_gram_is_split_invariant_drops_padding_and_merges():
    x = torch.randn(3, 50, 16, dtype=torch.float64)
    pad = torch.rand(3, 50) > 0.2
    full = GramAccumulator(16, dtype=torch.float64)
    full.update(x, pad)
    rows = x[pad]
    torch.testing.assert_close(full.xtx, rows.T @ rows)
    assert full.count == int(pad.sum())
    a, b = GramAccumulator(16, dtype=torch.float64, chunk_tokens=7), GramAccumulator(16, dtype=torch.float64)
    a.update(x[:1], pad[:1])
    b.update(x[1:], pad[1:])
    torch.testing.assert_close(a.merge(b).xtx, full.xtx)
    assert a.count == full.count
    torch.testing.assert_close(full.hessian(), full.xtx * 2 / full.count)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gram_of_half_inputs_with_large_activations_does_not_overflow(dtype):
    """Activations of ~1e3 squared and summed over 8192 tokens reach ~1e10: far past fp16's 65504. The
    accumulated Gram must be fp32 and match float64 (on CUDA through the fp32-output product)."""
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(2, 8192, 32, generator=g) * 1000).to(dtype)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    acc = GramAccumulator(32, device=device)
    acc.update(x.to(device))
    exact = x.double().reshape(-1, 32)
    exact = exact.T @ exact
    assert acc.xtx.dtype == torch.float32
    assert bool(torch.isfinite(acc.xtx).all())
    rel = float((acc.xtx.double().cpu() - exact).norm() / exact.norm())
    assert rel <= 1e-5, rel


def test_gram_accumulator_is_a_drop_in_hessian_for_sparsegpt():
    from optimum_statprune.tensor_math.sparsegpt import sparsegpt_prune

    x = _inputs(200, 16, seed=9).float()
    acc = GramAccumulator(16)
    acc.update(x)
    w = torch.randn(4, 16)
    r = sparsegpt_prune(w, acc.hessian(), 0.5, "2:4")
    assert nm_groups_intact(r.mask, 2, 4)

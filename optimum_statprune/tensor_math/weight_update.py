"""Weight update after any mask: reconstruct a pruned linear's surviving weights against its inputs.

Given a weight ``W0`` ``[d_out, d_in]``, a keep-mask ``M`` (from magnitude, Wanda, RIA, CVR, statprune,
...) and the Gram matrix ``G = X^T X`` of the layer's calibration inputs, find

    W = argmin ||X W0^T - X W^T||^2 + lam * sum_j G_jj (W0_ij - W_ij)^2   subject to  W = M (.) W

i.e. the masked least-squares reconstruction of every output row at once, with a ridge toward the dense
weight (the damping) that keeps the problem well posed when the calibration set is small. This is the
fixed-mask ADMM of Boza 2024 ("Fast and Effective Weight Update for Pruned Large Language Models",
arXiv 2401.02938), chosen over per-row solves because it needs one ``d_in x d_in`` inverse per layer and
then only plain matmuls over all rows, which is what a GPU does best:

    scale columns by s_j = sqrt(G_jj) (so diag(G) = 1 and |W| in the scaled space is Wanda's score)
    A = G_s + lam I;  B = W0_s A;  A_inv = (A + rho I)^-1            (one Cholesky per layer)
    Z = M (.) W0_s;  U = 0
    repeat: W = (B + rho (Z - U)) A_inv;  Z = M (.) (W + U);  U = U + W - Z
    return Z / s

``Z`` lies on the mask by construction, so pruned weights are never revived and N:M groups are never
broken. ``GradualMask`` re-chooses the mask from ``|W + U|`` (times an optional per-column score factor)
during the first iterations, with exact per-row counts (unstructured, the sparsity rising on a cubic
schedule) or exact N:M groups, as Boza's gradual variant does; the last chosen mask is then held fixed.

``GramAccumulator`` sums ``X^T X`` in the same pass as the other statistics. For half-precision inputs on
a GPU it multiplies fp16/bf16 chunks on tensor cores with an fp32 *result* (``torch.mm(..., out_dtype=
torch.float32)``), never an fp16-rounded partial sum: activations of ~1e3 squared and summed over a few
thousand tokens overflow fp16 (shared/notes/weight-update-h200.md). Elsewhere chunks are cast to fp32.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch

from .masks import make_mask, prune_count

# Relative dampening tried after a failure with ``damp == 0``.
_FIRST_NONZERO_DAMP = 1e-4


# ---------------------------------------------------------------------------------------------- masks
@dataclass
class GradualMask:
    """Re-choose the mask from the ADMM iterate during the first ``steps`` iterations.

    At iteration ``t < steps`` the mask keeps the highest ``|W + U| * factor`` (scaled space, where
    ``|W|`` alone is Wanda's score; ``column_factor`` multiplies the score of input column j, e.g.
    statprune's ``A_j^(p/2) (sigma_W(j)^2 + eps)^(-alpha/2) / ||X_j||``). Unstructured: exact per-row
    (or per-layer) counts at ``sparsity * (1 - (1 - (t+1)/steps)^exponent)`` (cubic by default), ending at
    exactly ``sparsity``. ``N:M``: exact N:M groups at every step. From ``steps`` on, the mask is fixed.
    """

    sparsity: float
    pattern: str = "unstructured"
    group: str = "row"
    steps: int = 15
    exponent: float = 3.0
    column_factor: torch.Tensor | None = None

    def sparsity_at(self, t: int) -> float:
        if self.pattern != "unstructured":
            return self.sparsity
        frac = min(1.0, (t + 1) / self.steps)
        return self.sparsity * (1.0 - (1.0 - frac) ** self.exponent)

    def mask_at(self, t: int, scores: torch.Tensor) -> torch.Tensor:
        return make_mask(scores, self.sparsity_at(t), self.pattern, self.group)


# ---------------------------------------------------------------------------------------------- update
@dataclass
class UpdateResult:
    """Outcome of ``masked_reconstruction`` for one weight matrix."""

    weight: torch.Tensor
    """float32 ``[d_out, d_in]``, exactly zero wherever ``mask`` is False."""
    mask: torch.Tensor
    """bool ``[d_out, d_in]``, True = kept: the input mask, or the last one a ``GradualMask`` chose."""
    damp: float
    """Relative dampening finally used (``lam / mean(diag(G_s))``; ``diag(G_s)`` is 1 for live inputs)."""
    retries: int
    """How many times the dampening had to be raised tenfold (Cholesky failure or non-finite result)."""
    error_mask: float = math.nan
    """``||X (W0 - M.W0)^T||^2``: the output error of the mask-only weights (same mask as ``weight``)."""
    error: float = math.nan
    """``||X (W0 - W)^T||^2``: the output error after the update."""
    iters: int = 0
    extra: dict = field(default_factory=dict)

    def record(self) -> dict:
        """The manifest record: what was used, and both errors."""
        return {"damp": self.damp, "retries": self.retries, "iters": self.iters,
                "error_mask": self.error_mask, "error": self.error, **self.extra}


@contextlib.contextmanager
def _matmul_precision(tf32: bool):
    """fp32 matmuls with TF32 ("high") or full fp32 ("highest") inside, restored afterwards."""
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high" if tf32 else "highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(old)


def output_error(w0: torch.Tensor, w: torch.Tensor, gram: torch.Tensor) -> float:
    """``||X (w0 - w)^T||^2 = sum_i (w0_i - w_i) G (w0_i - w_i)^T`` from the Gram matrix ``G = X^T X``."""
    d = (w0 - w).to(gram.dtype)
    return float(((d @ gram) * d).sum())


def _inverse(a: torch.Tensor) -> torch.Tensor | None:
    """``a^-1`` of a symmetric positive definite matrix via Cholesky, or None if it fails."""
    low, info = torch.linalg.cholesky_ex(a)
    if int(info.item()) != 0:
        return None
    inv = torch.cholesky_inverse(low)
    del low
    return inv if bool(torch.isfinite(inv).all()) else None


@torch.no_grad()
def masked_reconstruction(
    weight: torch.Tensor,
    mask: torch.Tensor,
    gram: torch.Tensor,
    *,
    damp: float = 0.1,
    rho: float = 1.0,
    iters: int = 20,
    mask_schedule: GradualMask | None = None,
    max_retries: int = 5,
    tf32: bool = False,
    errors: bool = True,
) -> UpdateResult:
    """Reconstruct ``weight``'s surviving entries against ``gram`` (``X^T X``) with ADMM, all rows at once.

    ``weight`` ``[d_out, d_in]`` (any float dtype, any device: math runs in fp32 on the weight's device),
    ``mask`` bool of the same shape (True = kept), ``gram`` ``[d_in, d_in]`` (``GramAccumulator.xtx``; any
    positive multiple works the same: everything is relative to its diagonal). ``damp`` is the ridge toward
    ``W0`` relative to ``mean(diag(G_s)) = 1`` (0.1 as in Boza's code: 20 iterations then nearly solve the
    problem; less damping fits the calibration set harder). ``rho`` is ADMM's penalty; ``iters`` the number
    of iterations (each is one ``[d_out, d_in] x [d_in, d_in]`` matmul). ``mask_schedule``: re-choose the
    mask during the first iterations (``GradualMask``), otherwise the mask is held fixed. ``tf32``: the
    iterations' matmuls in TF32 (the Gram, its inverse and the errors stay in full fp32).

    Inputs that never fired (``G_jj == 0``) cannot be reconstructed; their weights are kept as they were
    (they do not affect the calibration output). Raises ``torch.linalg.LinAlgError`` if no dampening up
    to ``damp * 10**max_retries`` gives a finite result, and ``ValueError`` on bad shapes or a non-finite
    Gram.
    """
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight [d_out, d_in], got shape {tuple(weight.shape)}")
    d_out, d_in = weight.shape
    if tuple(mask.shape) != (d_out, d_in):
        raise ValueError(f"mask shape {tuple(mask.shape)} differs from the weight's {tuple(weight.shape)}")
    if tuple(gram.shape) != (d_in, d_in):
        raise ValueError(f"gram must be [{d_in}, {d_in}] for a weight of shape {tuple(weight.shape)}")
    if damp < 0 or rho <= 0 or iters < 0 or max_retries < 0:
        raise ValueError(f"need damp >= 0, rho > 0, iters >= 0, max_retries >= 0 (got {damp}, {rho}, {iters}, {max_retries})")
    device = weight.device
    w0 = weight.detach().to(torch.float32)
    keep = mask.to(device=device, dtype=torch.bool)
    g = gram.detach().to(device=device, dtype=torch.float32)
    if not bool(torch.isfinite(g).all()):
        raise ValueError("the Gram matrix has non-finite entries (NaN or inf inputs reached this layer)")
    if not bool(torch.isfinite(w0).all()):
        raise ValueError("the weight has non-finite entries")

    diag = g.diagonal().clone()
    live = diag > 0
    s = torch.where(live, diag.clamp_min(0).sqrt(), torch.ones_like(diag))
    gs = g / s[:, None] / s[None, :]
    del g
    gs.diagonal()[~live] = 1.0  # dead inputs: a unit diagonal, so the ridge pins their weights to W0
    ws0 = w0 * s
    mean_diag = float(gs.diagonal().mean())

    rel = damp
    for retries in range(max_retries + 1):
        if retries:
            rel = rel * 10 if rel > 0 else _FIRST_NONZERO_DAMP
        a = gs.clone()
        a.diagonal().add_(rel * mean_diag)
        with _matmul_precision(False):
            b = ws0 @ a  # = (A W0_s^T)^T, A symmetric
        a.diagonal().add_(rho)
        ainv = _inverse(a)
        del a
        if ainv is None:
            continue
        with _matmul_precision(False):
            c = b @ ainv  # B A_inv, so each iteration is one matmul: W = C + rho (Z - U) A_inv
        del b
        z, final_mask = _admm(ws0, c, ainv, keep, rho, iters, mask_schedule, s, tf32)
        del ainv, c
        if bool(torch.isfinite(z).all()):
            w = z / s
            w.masked_fill_(~final_mask, 0.0)
            result = UpdateResult(weight=w, mask=final_mask, damp=rel, retries=retries, iters=iters)
            if errors:
                with _matmul_precision(False):
                    gr = gram.detach().to(device=device, dtype=torch.float32)
                    result.error_mask = output_error(w0, w0 * final_mask, gr)
                    result.error = output_error(w0, w, gr)
            return result
    raise torch.linalg.LinAlgError(
        f"weight update failed on a [{d_out}, {d_in}] weight: no finite result up to damp={rel:g} "
        f"({max_retries} retries); raise damp or check the calibration inputs"
    )


def _admm(ws0, c, ainv, keep, rho, iters, schedule, s, tf32):
    """The iterations in the scaled space; returns (Z, final mask). ``Z`` is zero outside the mask."""
    z = ws0 * keep
    u = torch.zeros_like(ws0)
    factor = None
    if schedule is not None:
        factor = torch.ones_like(s) if schedule.column_factor is None else (
            schedule.column_factor.to(s.device, torch.float32) / s)
    with _matmul_precision(tf32):
        for t in range(iters):
            w = torch.addmm(c, z - u, ainv, alpha=rho)  # (B + rho (Z - U)) A_inv
            w.add_(u)  # W + U
            if schedule is not None and t < schedule.steps:
                keep = schedule.mask_at(t, w.abs() * factor)
            z = w * keep
            u = w.sub_(z)  # U_new = U + W - Z = (W + U) - Z
    return z, keep


def nm_groups_intact(mask: torch.Tensor, n: int, m: int) -> bool:
    """True where every group of ``m`` consecutive inputs of every row keeps exactly ``n``."""
    d_out, d_in = mask.shape
    return bool((mask.reshape(d_out, d_in // m, m).sum(-1) == n).all())


def row_counts_exact(mask: torch.Tensor, sparsity: float) -> bool:
    """True where every row prunes exactly ``floor(sparsity * d_in)`` weights."""
    return bool((mask.shape[1] - mask.sum(1) == prune_count(mask.shape[1], sparsity)).all())

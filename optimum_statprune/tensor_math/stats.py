"""Statistics of a linear layer's input: per-channel count, sum and sum of squares plus a token
subsample (``ChannelStats``), the Gram matrix ``X^T X`` (``HessianAccumulator``), and the per-layer
container of whichever of the two a run needs (``LayerStatistics``).

Sums are kept in float64 so that half-precision activations of ~1e4 ("massive activations") neither
overflow nor lose their variance to cancellation in ``m2 - mean^2``. A half-precision batch gets its own
mean and variance in float32 first (Welford's update on CUDA, ``ChannelStats._add_welford``; sums about
the batch mean elsewhere, ``_add_shifted``), which is as safe and several times faster than float64
copies. Two accumulators merge by addition, so several devices can all-reduce them.

The token subsample (used by the least-squares scale and the safety check) is a bottom-k sample on a
hash of each token's global index: which rows are kept depends on the seed and on the token order,
never on how the tokens were split into batches.
"""

from __future__ import annotations

import functools

import torch

_M32 = 0xFFFFFFFF
# float64 elements converted at once; bounds the transient memory of an update.
_CHUNK_ELEMENTS = 1 << 24
_HALF = (torch.float16, torch.bfloat16)


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer mix ("lowbias32") computed in int64; inputs and outputs lie in [0, 2^32)."""
    x = x & _M32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def token_keys(index: torch.Tensor, seed: int) -> torch.Tensor:
    """Sampling priority of each global token index (smaller is kept first); unique per index."""
    h = _hash32(_hash32(index) ^ _hash32(torch.full_like(index, seed + 0x9E3779B9)))
    return (h << 31) | (index & 0x7FFFFFFF)


@functools.lru_cache(maxsize=4)
def _numbered_sample(first: int, n: int, seed: int, k: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The sampling keys of tokens ``first .. first + n - 1`` that are among their ``k`` smallest, and those
    tokens' positions (None: all ``n`` are). Every linear of a block that reads one micro-batch asks for the
    same (same seed, same tokens): computed once, not once per input (~20 small kernels each)."""
    keys = token_keys(torch.arange(first, first + n, device=device, dtype=torch.int64), seed)
    if n <= k:
        return keys, None
    keys, kept = torch.topk(keys, k, largest=False, sorted=False)
    return keys, kept


def token_rows(x: torch.Tensor, dim: int, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``x`` (``[..., dim]``) as rows of tokens, padding (``mask`` False) dropped."""
    if x.shape[-1] != dim:
        raise ValueError(f"expected inputs with {dim} channels, got shape {tuple(x.shape)}")
    rows = x.reshape(-1, dim)
    if mask is not None:
        rows = rows[mask.reshape(-1).to(device=rows.device, dtype=torch.bool)]
    return rows


def _sum_squares(d: torch.Tensor) -> torch.Tensor:
    """Column sums of ``d**2`` (float32 ``d``) in float64. On CUDA the norm kernel does it in one pass with
    tree-summed float32 partials; on a CPU that kernel sums a column sequentially (errors ~1e-5 at 4096
    rows), so square-then-sum (pairwise) is used there."""
    if d.is_cuda:
        return torch.linalg.vector_norm(d, dim=0).to(torch.float64).square()
    return d.square().sum(0).to(torch.float64)


class ChannelStats:
    """Accumulates statistics of a linear layer's input, one entry per input channel."""

    def __init__(
        self,
        dim: int,
        sample_size: int = 0,
        seed: int = 0,
        index_offset: int = 0,
        device: torch.device | str | None = None,
    ):
        self.dim = dim
        self.index_offset = index_offset
        self.sample_size = sample_size
        self.seed = seed
        self.count = 0
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.sumsq = torch.zeros(dim, dtype=torch.float64, device=device)
        self.sample_keys = torch.empty(0, dtype=torch.int64, device=device)
        self.sample_rows: torch.Tensor | None = None

    # ------------------------------------------------------------------ accumulation
    @torch.no_grad()
    def update(self, x: torch.Tensor, mask: torch.Tensor | None = None, index: torch.Tensor | None = None) -> None:
        """Add tokens ``x`` of shape ``[..., dim]``; ``mask`` (shape ``x.shape[:-1]``, True = real token) drops padding.

        ``index`` (one per kept row): each token's global index for the subsample, for an accumulator that
        sees only some of the tokens (an MoE expert sees those routed to it); by default the tokens are
        numbered on from ``index_offset`` in the order they arrive."""
        rows = token_rows(x, self.dim, mask)
        n = rows.shape[0]
        if index is not None and index.numel() != n:
            raise ValueError(f"{index.numel()} token indices for {n} tokens")
        if n == 0:
            return
        if self.sum.device != rows.device:
            self.to(rows.device)
        if rows.dtype in _HALF and rows.is_cuda:
            self._add_welford(rows)
        elif rows.dtype in _HALF:
            self._add_shifted(rows)
        else:
            step = max(1, _CHUNK_ELEMENTS // self.dim)
            for start in range(0, n, step):
                chunk = rows[start : start + step].to(torch.float64)
                self.sum += chunk.sum(0)
                self.sumsq += chunk.square().sum(0)
        if self.sample_size:
            if index is None:
                keys, kept = _numbered_sample(self.index_offset + self.count, n, self.seed, self.sample_size,
                                              rows.device)
                self._offer(keys, rows if kept is None else rows[kept])
            else:
                self._offer(token_keys(index.to(rows.device, torch.int64), self.seed), rows)
        self.count += n

    def _add_welford(self, rows: torch.Tensor) -> None:
        """Half-precision rows on CUDA: the batch's per-channel mean and variance by Welford's update in
        float32, in one read of the rows (``torch.batch_norm_stats``, the kernel of batch norm's statistics),
        moved to raw sums in float64. Welford's update keeps the spread, not the mean, so a channel with a
        large mean and a small spread loses nothing: errors of ~3e-7 of the variance on 16384-token batches
        of hard inputs (H200, ``benchmarks/channel_stats.py``; up to 2.2e-6 on the tests' small bfloat16
        batches), in ~1/3 of the shifted sums' time."""
        n = rows.shape[0]
        mean, invstd = torch.batch_norm_stats(rows.contiguous(), 0.0)  # eps 0: invstd = var ** -1/2
        mean, var = mean.to(torch.float64), invstd.to(torch.float64).pow(-2)  # a constant channel: inf -> 0
        self.sum += n * mean
        self.sumsq += n * (var + mean.square())

    def _add_shifted(self, rows: torch.Tensor) -> None:
        """Half-precision rows: float32 sums about the batch's own mean, moved to raw sums in float64.

        Converting every activation to float64 (the path for float32 inputs) costs ~5x the time of a
        float32 reduction that reads the half-precision values directly. Summing ``x - shift`` instead of
        ``x`` keeps float32 safe: the sums hold the spread, not the mean, so a channel with a large mean
        and a small spread loses nothing to ``m2 - mean^2``, which cancels in float64 only. Errors stay
        near 1e-7 of the variance (``benchmarks/channel_stats.py``), far below the inputs' own rounding."""
        n = rows.shape[0]
        shift32 = rows.sum(0, dtype=torch.float32) / n
        shift = shift32.to(torch.float64)
        ds = torch.zeros_like(self.sum)
        dq = torch.zeros_like(self.sumsq)
        step = max(1, _CHUNK_ELEMENTS // self.dim)
        for start in range(0, n, step):
            d = torch.sub(rows[start : start + step], shift32)  # float32 by type promotion
            ds += d.sum(0)
            dq += _sum_squares(d)
        self.sum += ds + n * shift
        self.sumsq += dq + 2 * shift * ds + n * shift.square()

    def _offer(self, keys: torch.Tensor, rows: torch.Tensor) -> None:
        k = min(self.sample_size, keys.numel())
        if keys.numel() > k:
            keys, idx = torch.topk(keys, k, largest=False, sorted=False)
            rows = rows[idx]
        if self.sample_rows is None:
            self.sample_keys, self.sample_rows = keys.clone(), rows.clone()
            return
        all_keys = torch.cat([self.sample_keys, keys.to(self.sample_keys.device)])
        all_rows = torch.cat([self.sample_rows, rows.to(self.sample_rows.device, self.sample_rows.dtype)])
        if all_keys.numel() > self.sample_size:
            all_keys, idx = torch.topk(all_keys, self.sample_size, largest=False, sorted=False)
            all_rows = all_rows[idx]
        self.sample_keys, self.sample_rows = all_keys, all_rows

    def merge(self, other: ChannelStats) -> ChannelStats:
        """Add another accumulator's tokens (e.g. from another device). Subsample keys must not collide,
        so accumulators that saw different tokens should be built with disjoint ``index_offset`` ranges."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge statistics of {other.dim} channels into {self.dim}")
        self.sum += other.sum.to(self.sum.device)
        self.sumsq += other.sumsq.to(self.sumsq.device)
        if self.sample_size and other.sample_rows is not None:
            self._offer(other.sample_keys.to(self.sum.device), other.sample_rows.to(self.sum.device))
        self.count += other.count
        return self

    def to(self, device: torch.device | str) -> ChannelStats:
        self.sum = self.sum.to(device)
        self.sumsq = self.sumsq.to(device)
        self.sample_keys = self.sample_keys.to(device)
        if self.sample_rows is not None:
            self.sample_rows = self.sample_rows.to(device)
        return self

    # ------------------------------------------------------------------ derived statistics
    def _require_tokens(self) -> None:
        if self.count == 0:
            raise ValueError("no calibration tokens reached this layer")

    @property
    def mean(self) -> torch.Tensor:
        self._require_tokens()
        return self.sum / self.count

    @property
    def second_moment(self) -> torch.Tensor:
        """``m2_j = sum x_j^2 / n``."""
        self._require_tokens()
        return self.sumsq / self.count

    @property
    def variance(self) -> torch.Tensor:
        """Population variance ``m2 - mean^2``, clamped at zero against rounding."""
        return (self.second_moment - self.mean.square()).clamp_min(0.0)

    @property
    def norm(self) -> torch.Tensor:
        """``||X_j||_2`` over all tokens seen (Wanda's activation norm)."""
        return self.sumsq.sqrt()

    @property
    def sample(self) -> torch.Tensor | None:
        """The subsampled token rows in a deterministic order (by key), or None if none were kept."""
        if self.sample_rows is None:
            return None
        order = torch.argsort(self.sample_keys)
        return self.sample_rows[order]


class HessianAccumulator:
    """Accumulates ``sum_t x_t x_t^T`` and the token count of a linear layer's input rows.

    The raw sum (not a running mean, unlike the reference) is what makes accumulators mergeable by
    addition. ``dtype`` is float32 by default, as in the reference; float64 costs twice the memory of a
    ``d_in x d_in`` matrix but makes batch-split differences negligible.
    """

    def __init__(
        self, dim: int, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
    ):
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"accumulate the Hessian in float32 or float64, not {dtype}")
        self.dim = dim
        self.count = 0
        self.xtx = torch.zeros(dim, dim, dtype=dtype, device=device)

    @torch.no_grad()
    def update(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Add tokens ``x`` of shape ``[..., dim]``; ``mask`` (shape ``x.shape[:-1]``, True = real token)
        drops padding, exactly as ``ChannelStats.update``."""
        rows = token_rows(x, self.dim, mask)
        if rows.shape[0] == 0:
            return
        if self.xtx.device != rows.device:
            self.to(rows.device)
        self._add_rows(rows)
        self.count += rows.shape[0]

    def _add_rows(self, rows: torch.Tensor) -> None:
        """``xtx += rows^T rows``, cast to the sum's dtype in chunks (bounded transient memory)."""
        step = max(1, _CHUNK_ELEMENTS // self.dim)
        for start in range(0, rows.shape[0], step):
            chunk = rows[start : start + step].to(self.xtx.dtype)
            self.xtx.addmm_(chunk.T, chunk)

    def merge(self, other: HessianAccumulator) -> HessianAccumulator:
        """Add another accumulator's tokens (e.g. from another device)."""
        if other.dim != self.dim:
            raise ValueError(f"cannot merge a Hessian of {other.dim} channels into {self.dim}")
        self.xtx += other.xtx.to(self.xtx.device, self.xtx.dtype)
        self.count += other.count
        return self

    def to(self, device: torch.device | str) -> HessianAccumulator:
        self.xtx = self.xtx.to(device)
        return self

    def hessian(self) -> torch.Tensor:
        """``H = 2/n * X^T X``, the Hessian of the mean squared output error ``1/n ||W X - W' X||^2``.

        This is the reference's scaling. Only the relative scale matters to ``sparsegpt_prune``: its
        dampening is relative to ``mean(diag(H))`` and the OBS updates are invariant to scaling ``H``;
        only the reported ``error`` scales with it."""
        if self.count == 0:
            raise ValueError("no calibration tokens reached this layer")
        return self.xtx * (2.0 / self.count)


# Token rows multiplied per chunk by GramAccumulator. Bounds the transient cast copy; the product is fp32.
_GRAM_CHUNK_TOKENS = 8192


def half_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor | None:
    """``a @ b`` with fp16/bf16 operands and an fp32 result (exact products, fp32 sums, on the tensor
    cores), or None where this torch/device has no such product (CPU, older torch)."""
    try:
        return torch.mm(a, b, out_dtype=torch.float32)
    except (RuntimeError, TypeError, NotImplementedError):
        return None


class GramAccumulator(HessianAccumulator):
    """Sums ``X^T X`` (fp32 or fp64) of a linear's input rows, padding excluded; mergeable by addition.

    A drop-in ``HessianAccumulator`` (``hessian()``, ``merge``, ``count``), so SparseGPT can read it too.
    What differs is the product for half-precision inputs: with ``half_inputs=True`` (default) fp16/bf16
    rows are multiplied as they are, with an fp32 output, where the device supports it (CUDA with a
    recent torch): about 10x faster than casting to fp32 first on an H200, and accurate to ~1e-4
    relative (the product is accumulated in fp32 inside the GEMM). fp32 inputs are multiplied in fp32
    (TF32 only if the caller enabled it globally). ``dtype=float64`` always casts, for tests.
    """

    def __init__(
        self,
        dim: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        half_inputs: bool = True,
        chunk_tokens: int = _GRAM_CHUNK_TOKENS,
    ):
        super().__init__(dim, dtype=dtype, device=device)
        self.half_inputs = half_inputs
        self.chunk_tokens = max(1, int(chunk_tokens))
        self.half_products = 0  # chunks multiplied with half inputs (reported, and checked in tests)

    def _add_rows(self, rows: torch.Tensor) -> None:
        """``xtx += rows^T rows``: half-precision rows on CUDA multiplied as they are into an fp32 product,
        anything else cast first (as ``HessianAccumulator`` does), ``chunk_tokens`` rows at a time."""
        half = (
            self.half_inputs
            and self.xtx.dtype == torch.float32
            and rows.dtype in (torch.float16, torch.bfloat16)
            and rows.device.type == "cuda"
        )
        for start in range(0, rows.shape[0], self.chunk_tokens):
            chunk = rows[start : start + self.chunk_tokens]
            product = None
            if half:
                contiguous = chunk.contiguous()
                product = half_product(contiguous.T, contiguous)
            if product is not None:
                self.xtx.add_(product)
                self.half_products += 1
            else:
                c = chunk.to(self.xtx.dtype)
                self.xtx.addmm_(c.T, c)


class LayerStatistics:
    """The statistics one layer's input is observed for: ``channel`` (``ChannelStats``) and/or ``hessian``
    (``X^T X``), None where the run does not need it. Both see the same tokens, so a method and a later
    step (compensation, a weight update) each read the statistic they need from one pass.

    ``fast_gram`` accumulates ``X^T X`` with ``GramAccumulator`` (a ``HessianAccumulator``
    that multiplies fp16/bf16 inputs with an fp32 result on CUDA, ~10x faster there; identical to
    ``HessianAccumulator`` elsewhere up to summation order) instead of ``HessianAccumulator``."""

    def __init__(
        self,
        dim: int,
        channel: bool = True,
        hessian: bool = False,
        sample_size: int = 0,
        seed: int = 0,
        device: torch.device | str | None = None,
        fast_gram: bool = False,
    ):
        if not (channel or hessian):
            raise ValueError("LayerStatistics needs at least one statistic (channel or hessian)")
        self.dim = dim
        self.channel = ChannelStats(dim, sample_size, seed=seed, device=device) if channel else None
        self.hessian: HessianAccumulator | None = None
        if hessian:
            if fast_gram:
                self.hessian = GramAccumulator(dim, device=device)
            else:
                self.hessian = HessianAccumulator(dim, device=device)

    def update(self, x: torch.Tensor, mask: torch.Tensor | None = None, index: torch.Tensor | None = None) -> None:
        """Add tokens ``x`` (``[..., dim]``, ``mask`` True = real token) to every statistic kept; ``index``: the
        kept tokens' global indices, as ``ChannelStats.update`` takes them."""
        if self.channel is not None:
            self.channel.update(x, mask, index)
        if self.hessian is not None:
            self.hessian.update(x, mask)

    @property
    def count(self) -> int:
        """Tokens seen (the same for every statistic kept)."""
        return self.channel.count if self.channel is not None else self.hessian.count  # type: ignore[union-attr]

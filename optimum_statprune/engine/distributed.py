"""Several processes through ``torch.distributed``: each rank runs its share of the calibration batches
through the block, the input statistics are all-reduced, the expensive per-layer solves are spread over
the ranks and broadcast, and every rank ends each block with the same weights.

Launch with ``torchrun --nproc-per-node N`` or ``accelerate launch``: both set ``WORLD_SIZE``/``RANK``/
``LOCAL_RANK`` and the rendezvous variables, and ``context()`` initialises the process group from them
(NCCL when CUDA is there, gloo on CPUs) unless the caller already did. With one process (no launcher)
nothing here runs a collective, so single-process results are untouched.

Why the results match one process: shares are contiguous runs of batches, and each rank knows every
batch's padding mask, so a rank's ``ChannelStats`` numbers its tokens from the real tokens of the batches
before its share (``token_offset``): the merged bottom-k subsample is one process's exactly. Channel sums
are float64 and are added in another order (relative differences ~1e-16); ``X^T X`` is all-reduced in
float64 and rounded back to its accumulator's dtype, so it differs from one process's float32 running sum
by float32 rounding (~1e-7 relative). docs/performance.md states the resulting tolerances.
"""

from __future__ import annotations

import atexit
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import distributed as dist

from ..tensor_math.stats import LayerStatistics

logger = logging.getLogger(__name__)

T = TypeVar("T")


class DistributedError(RuntimeError):
    """Another rank failed; this rank stops instead of waiting for it forever."""


@dataclass(frozen=True)
class DistContext:
    """This process's place among the ranks; ``world_size == 1`` means no collective is ever run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ----------------------------------------------------------------------------- collectives
    def _device(self) -> torch.device:
        """Where collective tensors live: the rank's GPU under NCCL, the host under gloo."""
        if dist.get_backend() == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")

    def broadcast_object(self, obj: T, src: int = 0) -> T:
        """``obj`` of rank ``src`` on every rank."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=src, device=self._device())
        return box[0]

    def gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        if not self.active:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def all_sum(self, value: float) -> float:
        """Sum of a Python float over the ranks, in float64."""
        if not self.active:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=self._device())
        dist.all_reduce(t)
        return float(t.item())

    def agree(self, error: BaseException | None) -> None:
        """Collective: re-raise ``error`` here, or raise ``DistributedError`` if another rank had one, so a
        failure on one rank stops them all instead of leaving the others in their next collective."""
        if not self.active:
            if error is not None:
                raise error
            return
        failures = self.gather_objects(None if error is None else f"{type(error).__name__}: {error}")
        if error is not None:
            raise error
        for r, msg in enumerate(failures):
            if msg is not None:
                raise DistributedError(f"rank {r} failed: {msg}")

    def on_main(self, job: Callable[[], T]) -> T:
        """``job()`` on rank 0 only (the rank that touches the output directory), its result broadcast to
        every rank and its error raised on every rank, so no rank waits forever on a failed one."""
        if not self.active:
            return job()
        result, error = None, None
        if self.is_main:
            try:
                result = job()
            except Exception as e:  # noqa: BLE001 - re-raised below, and reported to the other ranks
                error = e
        self.agree(error)
        return self.broadcast_object(result)

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    # ----------------------------------------------------------------------------- shares
    def share(self, n: int) -> range:
        """This rank's contiguous slice of ``n`` calibration batches, refused when a rank would get none."""
        if n < self.world_size:
            raise ValueError(
                f"{self.world_size} processes need at least {self.world_size} calibration batches (one each), got {n}; "
                "lower batch_size, raise nsamples, or launch fewer processes"
            )
        return self.part(n)

    def part(self, n: int) -> range:
        """This rank's contiguous slice of ``n`` items; slices differ in size by one at most (some may be
        empty when ``n`` is smaller than the world)."""
        base, extra = divmod(n, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return range(start, start + base + (1 if self.rank < extra else 0))


_CONTEXT: DistContext | None = None


def launched_rank() -> int:
    """This process's rank as the launcher (``torchrun``, ``accelerate launch``) set it in ``RANK``; 0 when
    not launched. Readable before any process group exists, e.g. to keep ranks > 0 quiet from the start."""
    return int(os.environ.get("RANK", "0"))


def context() -> DistContext:
    """The process group of the launcher (torchrun / accelerate launch), initialised on first use; a
    one-process context when no launcher started us.

    torch.distributed is used directly rather than accelerate's ``PartialState``: under torchrun on CPUs
    (accelerate 1.x, no ``--cpu`` config) ``PartialState`` reported one process and ``DistributedType.NO``.
    A group the caller already initialised (e.g. by ``PartialState`` on GPUs) is used as it is."""
    global _CONTEXT
    if dist.is_available() and dist.is_initialized():
        return DistContext(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or not dist.is_available():
        return DistContext()
    if _CONTEXT is None:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            torch.cuda.set_device(local)
            backend = "nccl"
        else:
            backend = "gloo"
        dist.init_process_group(backend=backend)
        # the group is ours: tear it down before interpreter shutdown, or the backend's threads may still be
        # running when their objects are destroyed (seen as "terminate called without an active exception")
        atexit.register(_destroy_group)
        logger.info("rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(), backend)
        _CONTEXT = DistContext(dist.get_rank(), dist.get_world_size(), local)
    return _CONTEXT


def _destroy_group() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank_device(ctx: DistContext, device: torch.device) -> torch.device:
    """A CUDA device without an index means this rank's GPU (``LOCAL_RANK``) when several processes run."""
    if ctx.active and device.type == "cuda" and device.index is None:
        return torch.device("cuda", ctx.local_rank)
    return device


# ----------------------------------------------------------------------------- batches and statistics
@dataclass(frozen=True)
class Share:
    """This rank's batches: their global indices and the real tokens of every batch before them."""

    batches: range
    token_offset: int
    check_batches: int  # how many of this rank's first batches are among the global first ``n`` checked

    @classmethod
    def of(cls, ctx: DistContext, batches: Sequence[Any], check_batches: int) -> Share:
        mine = ctx.share(len(batches)) if ctx.active else range(len(batches))
        offset = sum(_real_tokens(b) for b in batches[: mine.start])
        check = max(0, min(check_batches - mine.start, len(mine)))
        return cls(mine, offset, check)


def _real_tokens(batch: Any) -> int:
    mask = batch.attention_mask
    return int(mask.sum()) if mask is not None else batch.input_ids.numel()


def reduce_statistics(ctx: DistContext, stats: dict[str, LayerStatistics], names: Sequence[str],
                      make: Callable[[str], LayerStatistics]) -> None:
    """All-reduce the accumulators of ``names`` (in that order on every rank) into every rank's ``stats``.

    A name no token reached on this rank (an expert not routed to here) gets an empty accumulator from
    ``make`` when another rank has one. Accumulators shared by several names (q/k/v) are reduced once.
    Sums, counts and ``X^T X`` are added in float64; token subsamples are gathered and merged (bottom-k of
    the union, keyed by global token index: one process's subsample)."""
    if not ctx.active:
        return
    present = ctx.gather_objects([n in stats for n in names])
    seen: set[int] = set()
    unique: list[LayerStatistics] = []
    for k, name in enumerate(names):
        if not any(p[k] for p in present):
            continue
        acc = stats.get(name)
        if acc is None:
            acc = stats[name] = make(name)
        if id(acc) not in seen:
            seen.add(id(acc))
            unique.append(acc)
    if not unique:
        return
    device = ctx._device()
    # counts and channel sums (small) in one all-reduce; each X^T X on its own, so at most one float64
    # copy of one d_in x d_in matrix exists at a time
    flat: list[torch.Tensor] = []
    for acc in unique:
        flat.append(torch.tensor([float(acc.count)], dtype=torch.float64))
        if acc.channel is not None:
            flat += [acc.channel.sum, acc.channel.sumsq]
    sizes = [t.numel() for t in flat]
    buffer = torch.cat([t.to(device, torch.float64).reshape(-1) for t in flat])
    dist.all_reduce(buffer)
    parts = iter(buffer.split(sizes))
    samples = []
    for acc in unique:
        count = int(round(float(next(parts)[0])))
        if acc.channel is not None:
            ch = acc.channel
            ch.sum = next(parts).to(ch.sum.device, torch.float64).clone()
            ch.sumsq = next(parts).to(ch.sumsq.device, torch.float64).clone()
            ch.count = count
            if ch.sample_size:
                samples.append(ch)
        if acc.hessian is not None:
            h = acc.hessian
            xtx = h.xtx.to(device, torch.float64)
            dist.all_reduce(xtx)
            h.xtx = xtx.to(h.xtx.device, h.xtx.dtype)
            del xtx
            h.count = count
    if samples:
        local = [(ch.sample_keys.cpu(), ch.sample_rows.cpu() if ch.sample_rows is not None else None) for ch in samples]
        everyone = ctx.gather_objects(local)
        for j, ch in enumerate(samples):  # rebuilt from every rank's part (this rank's included)
            device = ch.sum.device
            ch.sample_keys, ch.sample_rows = torch.empty(0, dtype=torch.int64, device=device), None
            for part in everyone:
                keys, rows = part[j]
                if rows is not None:
                    ch._offer(keys.to(device), rows.to(device))


# ----------------------------------------------------------------------------- spreading solves
def owners(ctx: DistContext, shapes: Sequence[tuple[int, int]]) -> list[int]:
    """The rank that solves each target: longest solve first, each to the least loaded rank (ties to the
    lower rank), with a solve's cost taken as ``d_out * d_in^2`` (an OBS or least-squares sweep over
    ``d_in x d_in``). Deterministic, so every rank computes the same assignment. For a Llama-2-7B block on
    two ranks the busiest rank gets 50% of the work (round robin: 72%)."""
    load = [0] * ctx.world_size
    out = [0] * len(shapes)
    for k in sorted(range(len(shapes)), key=lambda k: (-shapes[k][0] * shapes[k][1] ** 2, k)):
        r = min(range(ctx.world_size), key=lambda r: (load[r], r))
        out[k] = r
        load[r] += shapes[k][0] * shapes[k][1] ** 2
    return out


def spread(ctx: DistContext, targets: Sequence[Any], solve: Callable[[Any], dict[str, Any]]) -> list[dict[str, Any]]:
    """Run ``solve(target)`` (which updates the target in place and returns its record) on the rank
    ``owners`` gives each target, then broadcast each weight, bias and record from there, so every rank
    ends with the same targets. A failure on any rank stops every rank."""
    records: list[dict[str, Any] | None] = [None] * len(targets)
    ranks = owners(ctx, [tuple(t.weight().shape) for t in targets])
    error = None
    try:
        for k, t in enumerate(targets):
            if ranks[k] == ctx.rank:
                records[k] = solve(t)
    except Exception as e:  # noqa: BLE001 - re-raised by agree() on this rank, reported to the others
        error = e
    ctx.agree(error)
    device = ctx._device()
    for k, t in enumerate(targets):
        src = ranks[k]
        mine = src == ctx.rank
        header = ctx.broadcast_object(
            (records[k], t.bias is not None) if mine else None, src=src)
        records[k], has_bias = header
        weight = t.weight().detach()
        buf = weight.to(device).contiguous() if mine else torch.empty(weight.shape, dtype=weight.dtype, device=device)
        dist.broadcast(buf, src=src)
        if not mine:
            t.set_weight(buf.to(weight.device))
        if has_bias:
            if not mine and t.bias is None:
                t.module.bias = torch.nn.Parameter(torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device))
            bias = t.bias.detach()
            bbuf = bias.to(device).contiguous()
            dist.broadcast(bbuf, src=src)
            if not mine:
                t.bias.data.copy_(bbuf.to(bias.device))
    return records  # type: ignore[return-value]

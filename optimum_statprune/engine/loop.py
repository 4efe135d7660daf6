"""The block loop: capture what the first block receives, then per block onload -> observe -> prune ->
re-run -> offload, so only one block's weights are ever on the compute device.

Where a block's weights come from and go back to is a ``BlockStore``; ``ModelBlockStore`` moves the
blocks of a loaded model between its home device and the compute device. The loop never touches the
rest of the model after capture. Its pieces: ``capture`` (block 0's inputs, replaying a block),
``observer`` (input statistics), ``prune_step`` (one weight: method, steps after the mask, checks).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import StatPruneConfig
from ..methods import CHANNEL, get_method
from ..tensor_math.owl import OWLAllocation, outlier_ratio, owl_allocate
from ..tensor_math.scores import wanda_score
from . import offload
from .capture import (
    ACTIVATION_PLACEMENTS,
    BlockInputs,
    CalibrationBatch,
    call_block,
    capture_block_inputs,
    choose_placement,
    to_host,
)
from .distributed import DistContext, Share, reduce_statistics, spread
from .observer import Observer, input_groups, observe
from .prune_step import (
    BlockReads,
    NonFiniteError,
    Uncompensated,
    block_safety_check,
    check_finite,
    check_weights_finite,
    prune_target,
)
from .targets import NoTargetsError, check_targets_found, find_blocks, find_targets, hidden_size

__all__ = [
    "ACTIVATION_PLACEMENTS",
    "BLOCK_CHECK_BATCHES",
    "BlockInputs",
    "BlockStore",
    "CalibrationBatch",
    "ModelBlockStore",
    "NoTargetsError",
    "NonFiniteError",
    "Observer",
    "PruneReport",
    "capture_block_inputs",
    "choose_placement",
    "default_device",
    "iter_batches",
    "prune_blocks",
    "prune_model",
    "prune_target",
]

logger = logging.getLogger(__name__)
_phase = torch.profiler.record_function
"""Names the engine's phases in a ``torch.profiler`` trace ("statprune::observe", ...); costs nothing
when no profiler runs."""

BLOCK_CHECK_BATCHES = 1
"""Calibration batches the block-level safety check runs the block on (three extra passes each)."""

class BlockStore(Protocol):
    """Where block ``i``'s weights come from and go back to."""

    blocks: Sequence[nn.Module]
    """Every block's module, possibly on the meta device: read for structure (target names) only."""

    def load(self, index: int, device: torch.device, original: bool = False) -> nn.Module:
        """Block ``index`` on ``device``; ``original`` asks for the unpruned weights."""
        ...

    def store(self, index: int, block: nn.Module) -> None:
        """Keep the pruned block and release it from the compute device."""
        ...

    def release(self, index: int, block: nn.Module) -> None:
        """Release a block that was only read."""
        ...


class ModelBlockStore:
    """Blocks of an already loaded model: moved to the compute device and back to where they were."""

    def __init__(self, blocks: nn.ModuleList):
        self.blocks = blocks
        self._home: dict[int, torch.device] = {}

    def load(self, index: int, device: torch.device, original: bool = False) -> nn.Module:
        block = self.blocks[index]
        self._home[index] = next(block.parameters()).device
        return block.to(device)

    def store(self, index: int, block: nn.Module) -> None:
        block.to(self._home.pop(index))

    release = store


@dataclass
class PruneReport:
    layers: list[dict[str, Any]] = field(default_factory=list)
    owl: dict[str, Any] | None = None
    block_seconds: list[float] = field(default_factory=list)
    seconds: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds of a streamed run's stages (``prune_checkpoint``): setup, reading the tensors outside the
    blocks (which includes waiting for the CUDA context, also given alone), capture, the blocks, flushing
    the writers, and the index, manifest and publish."""
    finite_checked_blocks: list[int] = field(default_factory=list)
    """Blocks whose outputs were checked for NaN/Inf: every block whose outputs feed the next one (with
    calibration data; without it there are no outputs, and the weights alone are checked)."""


def _reduce_observed(dist: DistContext, observer: Observer, targets: list) -> None:
    """All-reduce what ``observer`` gathered for ``targets`` over the ranks (empty accumulators where a rank
    saw no token of a target that another rank did)."""
    dims = {t.name: t.in_features for t in targets}
    reduce_statistics(dist, observer.stats, list(dims), lambda name: observer._accumulator(name, dims[name]))


def _solves_spread(config: StatPruneConfig) -> bool:
    """Whether a layer's pruning is an expensive solve worth spreading over the ranks (a method that updates
    the surviving weights, or a weight update after the mask); cheap ones run redundantly on every rank."""
    return get_method(config.method).updates_weights or config.resolve("update") != "none"


def _prune_block(block, inputs, i, hidden, blocks_path, config, device, sparsities=None,
                 dist: DistContext | None = None, share: Share | None = None,
                 inputs_checked: Callable[[], None] = lambda: None) -> list[dict[str, Any]]:
    """Observe block ``i``'s inputs and prune its targets; ``inputs_checked()`` runs after the first
    observation, before any weight changes (it raises if the inputs were not finite)."""
    dist = dist if dist is not None else DistContext()
    targets = find_targets(block, f"{blocks_path}.{i}", config.targets, config.ignore)
    level = dict(zip((t.name for t in targets), sparsities, strict=True)) if sparsities is not None else {}
    if not config.statistics:
        inputs_checked()
        check_weights_finite(targets)
        reads = BlockReads()
        records = [prune_target(t, None, config, level.get(t.name), reads=reads) for t in targets]
        reads.finish()
        return records
    observer = Observer(targets, config, device, i)
    observer.index_offset = share.token_offset if share is not None else 0
    block_check = (
        config.resolve("safety_check") and config.resolve("safety_scope") == "block"
        and config.resolved_compensation() != "none"
    )
    undo: list[Uncompensated] | None = [] if block_check else None
    if block_check:  # the dense block's output on the first batch: what the pruned block should reproduce
        check_batches = share.check_batches if share is not None else min(BLOCK_CHECK_BATCHES, len(hidden))
        reference = [call_block(block, inputs, i, b, hidden[b]).float() for b in range(check_batches)]
    records = []
    groups = input_groups(block, inputs, i, hidden, targets) if config.sequential else [targets]
    spread_solves = dist.active and _solves_spread(config)
    if spread_solves and block_check:
        raise ValueError("the block-level safety check of a compensation cannot be combined with a weight update "
                         "spread over several processes; use safety_scope='layer' or one process")
    for group in groups:
        with _phase("statprune::observe"):
            observe(block, inputs, i, hidden, observer, group, stop=config.sequential)
        inputs_checked()
        if dist.active:
            with _phase("statprune::reduce"):
                _reduce_observed(dist, observer, group)
        with _phase("statprune::prune"):
            if spread_solves:
                records += spread(dist, group, lambda t: prune_target(
                    t, observer.stats.get(t.name), config, level.get(t.name), undo))
                for t in group:
                    observer.stats.pop(t.name, None)
            else:
                check_weights_finite(group)
                reads = BlockReads()
                records += [prune_target(t, observer.stats.pop(t.name, None), config, level.get(t.name), undo, reads)
                            for t in group]
                reads.finish()
    if undo:
        block_safety_check(block, inputs, i, hidden, reference, check_batches, undo, dist.all_sum)
    return records


def _next_inputs(block, inputs: BlockInputs, i: int, hidden: list[torch.Tensor]) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Block ``i``'s outputs, the next block's inputs, and one flag per batch on the device: whether the
    batch's outputs are all finite (read by ``_OutputCheck``, without waiting for the GPU here)."""
    outputs, finite = [], []
    for b, h in enumerate(hidden):
        out = call_block(block, inputs, i, b, h)
        finite.append(torch.isfinite(out).all())
        outputs.append(to_host(out) if inputs.on_host else out)
    return outputs, torch.stack(finite) if finite else torch.ones(0, dtype=torch.bool)


class _OutputCheck:
    """NaN/Inf in a block's outputs stop the run before they spread, checked one step late.

    Reading the flags right after the block ran would make the host wait for the GPU, which then idles
    while the host stores the block and queues the next one. Instead they are read once the next block has
    been observed, before any of its weights change, where the host waits for the GPU anyway. A NaN
    therefore still stops the run before it reaches a pruned weight; the block that produced it may
    already be stored (its weights were checked finite), and a resumed run stops at the same place."""

    def __init__(self, blocks_path: str, dist: DistContext):
        self.blocks_path = blocks_path
        self.dist = dist
        self._pending: tuple[int, list[torch.Tensor], torch.Tensor] | None = None

    def expect(self, i: int, outputs: list[torch.Tensor], finite: torch.Tensor) -> None:
        self._pending = (i, outputs, finite)

    def __call__(self) -> None:
        if self._pending is None:
            return
        i, outputs, finite = self._pending
        self._pending = None
        error = None
        try:
            if finite.numel() and not bool(finite.all()):
                b = next(b for b, ok in enumerate(finite.tolist()) if not ok)
                check_finite(outputs[b], f"the output of block {self.blocks_path}.{i} (calibration batch {b})")
        except NonFiniteError as e:
            error = e
        if self.dist.active:  # a NaN on one rank stops every rank, not only the one that saw it
            self.dist.agree(error)
        elif error is not None:
            raise error


def owl_allocation(store, n_blocks, blocks_path, inputs, config, device, progress=True,
                   dist: DistContext | None = None) -> OWLAllocation:
    """OWL's dense pre-pass: each block's share of outlier Wanda scores on the dense model, then per-linear
    sparsities whose total equals uniform pruning at the config's sparsity. With several processes the
    statistics are all-reduced first, so every rank computes the same allocation."""
    dist = dist if dist is not None else DistContext()
    hidden = inputs.hidden
    ratios, shapes = [], []
    for i in tqdm(range(n_blocks), desc="OWL outlier scan", disable=not progress, unit="block"):
        block = store.load(i, device, original=True)
        targets = find_targets(block, f"{blocks_path}.{i}", config.targets, config.ignore)
        observer = Observer(targets, config, device, i, statistics=frozenset({CHANNEL}))
        observer.sample = 0
        observer.attach()
        outputs = []
        try:
            for b, h in enumerate(hidden):
                observer.begin_batch(inputs.token_masks[b])
                out = call_block(block, inputs, i, b, h)
                outputs.append(to_host(out) if inputs.on_host else out)
        finally:
            observer.detach()
        if dist.active:
            _reduce_observed(dist, observer, targets)
        scores = [wanda_score(t.weight(), observer.stats[t.name].channel) for t in targets if observer.stats.get(t.name)]
        ratios.append(outlier_ratio(scores, config.owl_threshold) if scores else 0.0)
        shapes.append([tuple(t.weight().shape) for t in targets])
        hidden = outputs
        store.release(i, block)
    return owl_allocate(ratios, shapes, config.effective_sparsity, config.owl_lambda, config.group)


@torch.no_grad()
def prune_blocks(
    store: BlockStore,
    n_blocks: int,
    blocks_path: str,
    inputs: BlockInputs,
    config: StatPruneConfig,
    device: torch.device,
    progress: bool = True,
    skip: set[int] | frozenset[int] = frozenset(),
    on_block_pruned: Callable[[int, list[dict[str, Any]]], None] | None = None,
    dist: DistContext | None = None,
    share: Share | None = None,
) -> PruneReport:
    """Prune blocks ``0..n_blocks-1`` in order, feeding each the pruned outputs of the one before.

    Blocks in ``skip`` were pruned by an earlier run: they are only re-run to make the next block's
    inputs. ``on_block_pruned(i, records)`` is called before block ``i`` is stored.

    Before anything is pruned, ``NoTargetsError`` if the config's ``targets``/``ignore`` leave no weight
    in any block; each block's outputs that feed the next block are checked for NaN/Inf
    (``NonFiniteError``), as ``prune_target`` checks each weight.

    With several processes (``dist``), ``inputs`` hold this rank's ``share`` of the calibration batches;
    every rank runs the same blocks and ends each with the same weights (``engine.distributed``)."""
    dist = dist if dist is not None else DistContext()
    progress = progress and dist.is_main
    report = PruneReport()
    start = time.perf_counter()
    check_targets_found(getattr(store, "blocks", None), n_blocks, blocks_path, config.targets, config.ignore)
    allocation = None
    if config.owl:
        allocation = owl_allocation(store, n_blocks, blocks_path, inputs, config, device, progress, dist)
        report.owl = {"ratios": allocation.ratios, "block_sparsity": allocation.block_sparsity,
                      "pruned": allocation.pruned, "total": allocation.total}
    hidden = inputs.hidden
    check_outputs = _OutputCheck(blocks_path, dist)
    bar = tqdm(range(n_blocks), desc="pruning blocks", disable=not progress, unit="block")
    for i in bar:
        t0 = time.perf_counter()
        with _phase("statprune::load"):
            block = store.load(i, device)
        if dist.active:  # a finished block whose shard changed is pruned again: every rank must see that alike
            skipped = dist.gather_objects(i in skip)
            if len(set(skipped)) > 1:
                raise RuntimeError(f"the ranks disagree on whether block {i} was already pruned: {skipped}")
        if i not in skip:
            sparsities = allocation.sparsity[i] if allocation is not None else None
            records = _prune_block(block, inputs, i, hidden, blocks_path, config, device, sparsities, dist, share,
                                   check_outputs)
        check_outputs()  # a block that was not pruned here (finished earlier): before its outputs are made
        if i < n_blocks - 1:
            with _phase("statprune::next_inputs"):
                hidden, finite = _next_inputs(block, inputs, i, hidden)
            check_outputs.expect(i, hidden, finite)
            if hidden:
                report.finite_checked_blocks.append(i)
                if i not in skip:
                    for rec in records:
                        rec["finite_checked"].append("block_output")
        if i not in skip:
            report.layers.extend(records)
            if on_block_pruned is not None:
                on_block_pruned(i, records)
        with _phase("statprune::store"):
            store.store(i, block)
        report.block_seconds.append(time.perf_counter() - t0)
    report.seconds = time.perf_counter() - start
    return report


def prune_model(
    model: nn.Module,
    batches: Sequence[CalibrationBatch],
    config: StatPruneConfig,
    device: torch.device | str | None = None,
    blocks: str | None = None,
    progress: bool = True,
    activations: str = "auto",
    dist: DistContext | None = None,
) -> PruneReport:
    """Prune a loaded model's decoder blocks in place. ``activations``: where calibration hidden states
    live between blocks ("device", "host", or "auto" by free GPU memory). With several processes
    (``dist``) every rank holds the model and ``batches`` (all of them), runs its share, and ends with the
    same pruned model."""
    dist = dist if dist is not None else DistContext()
    device = torch.device(device) if device is not None else default_device()
    share = None
    if dist.active and config.needs_activations:
        share = Share.of(dist, batches, BLOCK_CHECK_BATCHES)
        batches = [batches[b] for b in share.batches]
    blocks_path, block_list = find_blocks(model, blocks)
    # A model dispatched by accelerate (device_map with "cpu"/"disk") keeps offloaded weights in its hooks'
    # weights maps: place them from there, write pruned ones back there, hooks off meanwhile.
    dispatched = offload.is_dispatched(model)
    store = offload.OffloadedBlockStore(block_list, model, blocks_path) if dispatched else ModelBlockStore(block_list)
    was_training = model.training
    model.eval()
    try:
        with offload.hooks_disabled(model) if dispatched else contextlib.nullcontext():
            if config.needs_activations:
                on_host = choose_placement(activations, batches, hidden_size(model), model.dtype, device)
                with offload.onloaded_outside(model, blocks_path, device) if dispatched else contextlib.nullcontext():
                    inputs = capture_block_inputs(model, blocks_path, block_list, batches, device, on_host)
            else:
                inputs = BlockInputs([], False, [], [], [])
            return prune_blocks(store, len(block_list), blocks_path, inputs, config, device, progress,
                                dist=dist, share=share)
    finally:
        model.train(was_training)


def default_device() -> torch.device:
    """cuda when available, else cpu."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def iter_batches(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, batch_size: int) -> Iterator[CalibrationBatch]:
    for s in range(0, input_ids.shape[0], batch_size):
        m = attention_mask[s : s + batch_size] if attention_mask is not None else None
        yield CalibrationBatch(input_ids[s : s + batch_size], m)

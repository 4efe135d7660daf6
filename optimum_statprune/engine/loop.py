"""The block loop: capture what the first block receives, then per block onload -> observe -> prune ->
re-run -> offload, so only one block's weights are ever on the compute device.

Where a block's weights come from and go back to is a ``BlockStore``; ``ModelBlockStore`` moves the
blocks of a loaded model between its home device and the compute device. The loop never touches the
rest of the model after capture.
"""

from __future__ import annotations

import contextlib
import logging
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn
from tqdm.auto import tqdm

from ..config import StatPruneConfig
from ..tensor_math.compensation import compensate
from ..tensor_math.masks import make_mask
from ..tensor_math.owl import OWLAllocation, outlier_ratio, owl_allocate
from ..tensor_math.scores import layer_scores, wanda_score
from ..tensor_math.sparsegpt import HessianAccumulator, sparsegpt_prune
from ..tensor_math.stats import ChannelStats
from . import offload
from .targets import Target, find_blocks, find_targets, text_config

logger = logging.getLogger(__name__)


class _Stop(Exception):
    """Raised from a hook to end a forward pass early once everything needed was seen."""


@dataclass
class CalibrationBatch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None = None  # [B, T], 1 = real token; None = no padding


@dataclass
class BlockInputs:
    """Per micro-batch: the hidden states entering the block, and each block's other arguments."""

    hidden: list[torch.Tensor]
    hidden_as_kwarg: bool
    args: list[list[tuple]]  # [block][batch] positional args after hidden_states
    kwargs: list[list[dict[str, Any]]]  # [block][batch]
    token_masks: list[torch.Tensor | None]
    on_host: bool = False  # hidden states kept in (pinned) host memory between blocks
    device: torch.device | None = None  # where the blocks run


class BlockStore(Protocol):
    """Where block ``i``'s weights come from and go back to."""

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


# ---------------------------------------------------------------------------------------------- capture
def _move_outside(model: nn.Module, blocks_path: str, device: torch.device) -> dict[str, torch.device]:
    """Move every parameter and buffer outside the blocks to ``device``; return where each was."""
    homes: dict[str, torch.device] = {}
    for name, module in model.named_modules():
        if name == blocks_path or name.startswith(blocks_path + "."):
            continue
        for pname, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            homes[f"{name}.{pname}"] = t.device
            if t.device != device:
                t.data = t.data.to(device)
    return homes


def _restore_outside(model: nn.Module, homes: dict[str, torch.device]) -> None:
    for name, module in model.named_modules():
        for pname, t in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            home = homes.get(f"{name}.{pname}")
            if home is not None and t.device != home:
                t.data = t.data.to(home)


ACTIVATION_PLACEMENTS = ("auto", "device", "host")
BLOCK_CHECK_BATCHES = 1
"""Calibration batches the block-level safety check runs the block on (three extra passes each)."""


def _to_host(t: torch.Tensor) -> torch.Tensor:
    t = t.to("cpu")
    return t.pin_memory() if torch.cuda.is_available() else t


def choose_placement(
    placement: str, batches: Sequence[CalibrationBatch], hidden_size: int, dtype: torch.dtype, device: torch.device
) -> bool:
    """True = keep hidden states on the host. ``auto`` keeps them on the GPU when two copies (a block's
    inputs and outputs) fit in half of its free memory, leaving the rest for the block and its work."""
    if placement not in ACTIVATION_PLACEMENTS:
        raise ValueError(f"activations={placement!r}: choose one of {', '.join(ACTIVATION_PLACEMENTS)}")
    if placement != "auto":
        return placement == "host"
    if device.type != "cuda":
        return False
    tokens = sum(b.input_ids.numel() for b in batches)
    need = 2 * tokens * hidden_size * torch.empty((), dtype=dtype).element_size()
    free, _ = torch.cuda.mem_get_info(device)
    on_host = need > free / 2
    logger.info("calibration activations: %.2f GiB, kept on the %s", need / 2**30, "host" if on_host else "GPU")
    return on_host


@torch.no_grad()
def capture_block_inputs(
    model: nn.Module,
    blocks_path: str,
    blocks: nn.ModuleList,
    batches: Sequence[CalibrationBatch],
    device: torch.device,
    on_host: bool = False,
) -> BlockInputs:
    """Run the model with every block replaced by a recorder, so one cheap pass yields block 0's hidden
    states and every block's own keyword arguments (masks and rotary embeddings can differ per block,
    e.g. sliding-window layers). No block's weights are touched."""
    inputs = BlockInputs([], False, [[] for _ in blocks], [[] for _ in blocks], [], on_host, device)
    keep = _to_host if on_host else (lambda t: t)
    last = len(blocks) - 1

    def recorder(index: int) -> Callable:
        def record(*args, **kwargs):
            if index == 0:
                if args:
                    inputs.hidden.append(keep(args[0]))
                else:
                    inputs.hidden.append(keep(kwargs["hidden_states"]))
                    inputs.hidden_as_kwarg = True
            rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            inputs.args[index].append(tuple(args[1:]))
            inputs.kwargs[index].append(rest)
            if index == last:
                raise _Stop
            return args[0] if args else kwargs["hidden_states"]

        return record

    homes = _move_outside(model, blocks_path, device)
    for i, block in enumerate(blocks):
        block.forward = recorder(i)
    try:
        for batch in batches:
            mask = batch.attention_mask.to(device) if batch.attention_mask is not None else None
            with contextlib.suppress(_Stop):
                model(input_ids=batch.input_ids.to(device), attention_mask=mask, use_cache=False)
            inputs.token_masks.append(mask.bool() if mask is not None else None)
    finally:
        for block in blocks:
            del block.forward  # back to the class's forward
        _restore_outside(model, homes)
    if len(inputs.hidden) != len(batches):
        raise RuntimeError("the first decoder block was not reached during calibration")
    return inputs


# ---------------------------------------------------------------------------------------------- observe
class Observer:
    """Forward hooks that feed each target's accumulator with the target's inputs.

    The accumulator is ``ChannelStats`` (first-order methods) or ``HessianAccumulator`` (SparseGPT).
    Targets that read the very same input tensor (q/k/v, gate/up) share one accumulator, found on the
    first micro-batch, so their statistics are computed once."""

    def __init__(
        self, targets: list[Target], config: StatPruneConfig, device: torch.device, block_index: int, kind: str = "stats"
    ):
        self.targets = targets
        self.stats: dict[str, Any] = {}
        self.token_mask: torch.Tensor | None = None
        self.device = device
        self.kind = kind
        self.sample = config.sample_tokens if kind == "stats" and _needs_sample(config) else 0
        # Distinct seeds per block so different layers do not keep the same token positions.
        self.seed = config.seed + 7919 * block_index
        self._followers: set[str] = set()
        self._batch_inputs: dict[int, tuple[weakref.ref, str]] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._stop_after: set[int] | None = None
        self._seen: set[int] = set()

    def _accumulator(self, name: str, dim: int):
        acc = self.stats.get(name)
        if acc is None:
            if self.kind == "hessian":
                acc = HessianAccumulator(dim, device=self.device)
            else:
                acc = ChannelStats(dim, self.sample, seed=self.seed, device=self.device)
            self.stats[name] = acc
        return acc

    def begin_batch(self, token_mask: torch.Tensor | None) -> None:
        """Set the padding mask of the micro-batch about to run; early stopping starts afresh."""
        self.token_mask = token_mask
        self._seen = set()
        self._batch_inputs = {}

    def _masked(self, x: torch.Tensor) -> torch.Tensor | None:
        m = self.token_mask
        if m is None:
            return None
        if x.shape[:-1] == m.shape:
            return m
        if x.dim() == 2 and x.shape[0] == m.numel():
            return m.reshape(-1)
        return None

    def attach(self, targets: list[Target] | None = None, stop_when_done: bool = False) -> None:
        """Hook ``targets`` (default all); with ``stop_when_done``, end the forward once each has fired."""
        targets = self.targets if targets is None else targets
        modules: dict[int, tuple[nn.Module, list[Target]]] = {}
        for t in targets:
            modules.setdefault(id(t.module), (t.module, []))[1].append(t)
        self._stop_after = set(modules) if stop_when_done else None
        for key, (module, ts) in modules.items():
            hook = self._expert_hook(key, ts) if ts[0].kind == "expert" else self._linear_hook(key, ts[0])
            self._handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _done(self, key: int) -> None:
        if self._stop_after is not None:
            self._seen.add(key)
            if self._seen >= self._stop_after:
                raise _Stop

    def _linear_hook(self, key: int, target: Target) -> Callable:
        name = target.name

        def hook(module, args, kwargs):
            x = args[0] if args else kwargs["input"]
            if name not in self._followers:
                seen = self._batch_inputs.get(id(x))
                if name not in self.stats and seen is not None and seen[0]() is x:
                    self.stats[name] = self.stats[seen[1]]  # same tensor as an earlier target: share
                    self._followers.add(name)
                else:
                    self._accumulator(name, target.in_features).update(x.detach(), self._masked(x))
                    self._batch_inputs[id(x)] = (weakref.ref(x), name)
            self._done(key)

        return hook

    def _expert_hook(self, key: int, targets: list[Target]) -> Callable:
        by_expert: dict[int, dict[str, Target]] = {}
        for t in targets:
            by_expert.setdefault(t.expert, {})[t.param] = t

        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            top_k_index = args[1] if len(args) > 1 else kwargs["top_k_index"]
            hidden = hidden.reshape(-1, hidden.shape[-1]).detach()
            mask = self._masked(hidden)
            for e, ts in by_expert.items():
                routed = (top_k_index == e).any(dim=-1)
                if mask is not None:
                    routed = routed & mask
                x = hidden[routed]
                if x.shape[0] == 0:
                    continue
                if "gate_up_proj" in ts:
                    self._accumulator(ts["gate_up_proj"].name, x.shape[-1]).update(x)
                if "down_proj" in ts:
                    gate_up = Target("", module, "expert", "gate_up_proj", e).weight()
                    h = module._apply_gate(nn.functional.linear(x, gate_up))
                    self._accumulator(ts["down_proj"].name, h.shape[-1]).update(h)
            self._done(key)

        return hook


def _needs_sample(config: StatPruneConfig) -> bool:
    return config.resolved_compensation() != "none"


def _accumulator_kind(config: StatPruneConfig) -> str:
    return "hessian" if config.method == "sparsegpt" else "stats"


# ---------------------------------------------------------------------------------------------- prune
@torch.no_grad()
def prune_target(
    target: Target,
    stats: Any,
    config: StatPruneConfig,
    sparsity: float | None = None,
    uncompensated: list[Uncompensated] | None = None,
) -> dict[str, Any]:
    """Score, mask and compensate one weight in place (or run SparseGPT on it); return its manifest
    record. ``stats`` is the target's accumulator (None for magnitude); ``sparsity`` overrides the
    config's (OWL). Where a compensation was applied and ``uncompensated`` is a list, the plain pruned
    weight and the original bias are appended to it, so a block-level check can undo the compensation."""
    w0 = target.weight().detach().to(torch.float32)
    sparsity = config.sparsity if sparsity is None else sparsity
    method = config.method
    record: dict[str, Any] = {"name": target.name, "shape": list(w0.shape), "method": method}
    record["transposed"] = target.transposed
    if target.expert is not None:
        record["expert"] = target.expert
    if config.needs_activations and (stats is None or stats.count == 0):
        # An expert no calibration token was routed to: nothing to calibrate with.
        method, stats = "magnitude", None
        record["fallback"] = "magnitude: no calibration tokens reached this weight"
    record["tokens"] = stats.count if stats is not None else 0
    if method == "sparsegpt":
        result = sparsegpt_prune(
            w0, stats.hessian(), sparsity, config.pattern, blocksize=config.sparsegpt_blocksize,
            percdamp=config.sparsegpt_damp, group=config.group,
        )
        target.set_weight(result.weight)
        mask = result.mask
        record["sparsegpt"] = {"percdamp": result.percdamp, "retries": result.retries, "error": result.error}
        if result.retries:
            logger.warning("%s: Cholesky needed %d retries (dampening %.3g)", target.name, result.retries, result.percdamp)
        record["compensation"] = {"kind": "none", "applied": False}
    else:
        mask = make_mask(layer_scores(method, w0, stats, config), sparsity, config.pattern, config.group)
        kind = config.resolved_compensation() if stats is not None else "none"
        if kind == "bias" and target.bias is None and not config.add_bias:
            kind = "none"
        layer_check = config.resolve("safety_check") and config.resolve("safety_scope") == "layer"
        result = compensate(
            w0, mask, kind, stats,
            has_bias=target.bias is not None, add_bias=config.add_bias, ec_steps=config.ec_steps,
            ec_centered=config.ec_centered, ec_clamp=config.ec_clamp, shrink=config.resolve("compensation_shrink"),
            safety_check=layer_check,
        )
        if uncompensated is not None and result.record.get("applied"):
            bias = target.bias.detach().clone() if target.bias is not None else None
            uncompensated.append(Uncompensated(target, w0 * mask, bias, result.record))
        target.set_weight(result.weight)
        if result.bias_delta is not None:
            _shift_bias(target, result.bias_delta)
        record["compensation"] = result.record
    record["pattern"] = config.pattern
    record["sparsity"] = 1.0 - float(mask.sum()) / mask.numel()
    return record


def _shift_bias(target: Target, delta: torch.Tensor) -> None:
    module = target.module
    if module.bias is None:
        weight = target.weight()
        module.bias = nn.Parameter(torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device))
    module.bias.add_(delta.to(module.bias.dtype))


@dataclass
class Uncompensated:
    """A target's weight and bias as they were before compensation, and its compensation record."""

    target: Target
    weight: torch.Tensor
    bias: torch.Tensor | None
    record: dict[str, Any]

    def swap(self) -> None:
        """Exchange the target's current weight and bias with the ones kept here."""
        current_w = self.target.weight().detach().clone()
        current_b = self.target.bias.detach().clone() if self.target.bias is not None else None
        self.target.set_weight(self.weight)
        if self.bias is None:
            if self.target.bias is not None:  # the compensation added a bias the layer did not have
                self.target.module.bias = None
        else:
            module = self.target.module
            if module.bias is None:
                module.bias = nn.Parameter(self.bias.clone())
            else:
                module.bias.data.copy_(self.bias)
        self.weight, self.bias = current_w, current_b


def _block_error(block, inputs, i, hidden, reference, batches) -> float:
    """Squared error of the block's output against ``reference`` over the first ``batches`` batches."""
    total = 0.0
    for b in range(batches):
        diff = (_call_block(block, inputs, i, b, hidden[b]).float() - reference[b]).square().sum(-1)
        mask = inputs.token_masks[b]
        if mask is not None:
            diff = diff * mask.to(diff.device, diff.dtype)
        total += float(diff.sum())
    return total


def _block_safety_check(block, inputs, i, hidden, reference, batches, undo: list[Uncompensated]) -> None:
    """Keep the block's compensations only if together they lower the block output's error against the
    dense block; record the decision and both errors in every compensated target's record."""
    err_comp = _block_error(block, inputs, i, hidden, reference, batches)
    for u in undo:
        u.swap()
    err_none = _block_error(block, inputs, i, hidden, reference, batches)
    keep = err_comp < err_none
    if keep:
        for u in undo:
            u.swap()
    for u in undo:
        u.record["block_check"] = {"error_none": err_none, "error_compensated": err_comp}
        u.record["applied"] = keep


# ---------------------------------------------------------------------------------------------- loop
@dataclass
class PruneReport:
    layers: list[dict[str, Any]] = field(default_factory=list)
    owl: dict[str, Any] | None = None
    block_seconds: list[float] = field(default_factory=list)
    seconds: float = 0.0


def _call_block(block: nn.Module, inputs: BlockInputs, i: int, b: int, hidden: torch.Tensor) -> torch.Tensor:
    args, kwargs = inputs.args[i][b], inputs.kwargs[i][b]
    if inputs.on_host:
        hidden = hidden.to(inputs.device, non_blocking=True)
    out = block(*args, hidden_states=hidden, **kwargs) if inputs.hidden_as_kwarg else block(hidden, *args, **kwargs)
    return out[0] if isinstance(out, (tuple, list)) else out


def _observe(block, inputs, i, hidden, observer: Observer, targets=None, stop=False) -> None:
    observer.attach(targets, stop_when_done=stop)
    try:
        for b, h in enumerate(hidden):
            observer.begin_batch(inputs.token_masks[b])
            with contextlib.suppress(_Stop):
                _call_block(block, inputs, i, b, h)
    finally:
        observer.detach()


def _input_groups(block, inputs, i, hidden, targets: list[Target]) -> list[list[Target]]:
    """Targets grouped by the tensor they read (q/k/v share one input), in the order the block runs them."""
    order: list[tuple[int, Target]] = []
    handles = []
    by_module: dict[int, list[Target]] = {}
    for t in targets:
        by_module.setdefault(id(t.module), []).append(t)
    for ts in by_module.values():

        def hook(module, args, kwargs, ts=ts):
            x = args[0] if args else next(iter(kwargs.values()))
            key = (x.data_ptr(), tuple(x.shape))
            for t in ts:
                order.append((hash(key), t))

        handles.append(ts[0].module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        _call_block(block, inputs, i, 0, hidden[0])
    finally:
        for h in handles:
            h.remove()
    groups: dict[int, list[Target]] = {}
    for key, t in order:
        if t not in groups.setdefault(key, []):
            groups[key].append(t)
    # Fused experts read the same tensor as their siblings only by accident; keep each module whole.
    return list(groups.values())


def _prune_block(block, inputs, i, hidden, blocks_path, config, device, sparsities=None) -> list[dict[str, Any]]:
    targets = find_targets(block, f"{blocks_path}.{i}", config.targets, config.ignore)
    level = dict(zip((t.name for t in targets), sparsities, strict=True)) if sparsities is not None else {}
    if not config.needs_activations:
        return [prune_target(t, None, config, level.get(t.name)) for t in targets]
    observer = Observer(targets, config, device, i, _accumulator_kind(config))
    block_check = (
        config.resolve("safety_check") and config.resolve("safety_scope") == "block"
        and config.resolved_compensation() != "none"
    )
    undo: list[Uncompensated] | None = [] if block_check else None
    if block_check:  # the dense block's output on the first batch: what the pruned block should reproduce
        check_batches = min(BLOCK_CHECK_BATCHES, len(hidden))
        reference = [_call_block(block, inputs, i, b, hidden[b]).float() for b in range(check_batches)]
    records = []
    groups = _input_groups(block, inputs, i, hidden, targets) if config.sequential else [targets]
    for group in groups:
        _observe(block, inputs, i, hidden, observer, group, stop=config.sequential)
        records += [prune_target(t, observer.stats.pop(t.name, None), config, level.get(t.name), undo) for t in group]
    if undo:
        _block_safety_check(block, inputs, i, hidden, reference, check_batches, undo)
    return records


def owl_allocation(store, n_blocks, blocks_path, inputs, config, device, progress=True) -> OWLAllocation:
    """OWL's dense pre-pass: each block's share of outlier Wanda scores on the dense model, then per-linear
    sparsities whose total equals uniform pruning at ``config.sparsity``."""
    hidden = inputs.hidden
    ratios, shapes = [], []
    for i in tqdm(range(n_blocks), desc="OWL outlier scan", disable=not progress, unit="block"):
        block = store.load(i, device, original=True)
        targets = find_targets(block, f"{blocks_path}.{i}", config.targets, config.ignore)
        observer = Observer(targets, config, device, i, "stats")
        observer.sample = 0
        observer.attach()
        outputs = []
        try:
            for b, h in enumerate(hidden):
                observer.begin_batch(inputs.token_masks[b])
                out = _call_block(block, inputs, i, b, h)
                outputs.append(_to_host(out) if inputs.on_host else out)
        finally:
            observer.detach()
        scores = [wanda_score(t.weight(), observer.stats[t.name]) for t in targets if observer.stats.get(t.name)]
        ratios.append(outlier_ratio(scores, config.owl_threshold) if scores else 0.0)
        shapes.append([tuple(t.weight().shape) for t in targets])
        hidden = outputs
        store.release(i, block)
    return owl_allocate(ratios, shapes, config.sparsity, config.owl_lambda, config.group)


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
) -> PruneReport:
    """Prune blocks ``0..n_blocks-1`` in order, feeding each the pruned outputs of the one before.

    Blocks in ``skip`` were pruned by an earlier run: they are only re-run to make the next block's
    inputs. ``on_block_pruned(i, records)`` is called before block ``i`` is stored."""
    report = PruneReport()
    start = time.perf_counter()
    allocation = None
    if config.owl:
        allocation = owl_allocation(store, n_blocks, blocks_path, inputs, config, device, progress)
        report.owl = {"ratios": allocation.ratios, "block_sparsity": allocation.block_sparsity,
                      "pruned": allocation.pruned, "total": allocation.total}
    hidden = inputs.hidden
    bar = tqdm(range(n_blocks), desc="pruning blocks", disable=not progress, unit="block")
    for i in bar:
        t0 = time.perf_counter()
        block = store.load(i, device)
        if i not in skip:
            sparsities = allocation.sparsity[i] if allocation is not None else None
            records = _prune_block(block, inputs, i, hidden, blocks_path, config, device, sparsities)
            report.layers.extend(records)
            if on_block_pruned is not None:
                on_block_pruned(i, records)
        if i < n_blocks - 1:
            outputs = (_call_block(block, inputs, i, b, h) for b, h in enumerate(hidden))
            hidden = [_to_host(o) for o in outputs] if inputs.on_host else list(outputs)
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
) -> PruneReport:
    """Prune a loaded model's decoder blocks in place. ``activations``: where calibration hidden states
    live between blocks ("device", "host", or "auto" by free GPU memory)."""
    device = torch.device(device) if device is not None else default_device()
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
                on_host = choose_placement(activations, batches, _hidden_size(model), model.dtype, device)
                with offload.onloaded_outside(model, blocks_path, device) if dispatched else contextlib.nullcontext():
                    inputs = capture_block_inputs(model, blocks_path, block_list, batches, device, on_host)
            else:
                inputs = BlockInputs([], False, [], [], [])
            return prune_blocks(store, len(block_list), blocks_path, inputs, config, device, progress)
    finally:
        model.train(was_training)


def _hidden_size(model: nn.Module) -> int:
    config = text_config(model)
    for name in ("hidden_size", "n_embd", "d_model"):
        if getattr(config, name, None):
            return int(getattr(config, name))
    return model.get_input_embeddings().weight.shape[1]


def default_device() -> torch.device:
    """cuda when available, else cpu."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def iter_batches(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, batch_size: int) -> Iterator[CalibrationBatch]:
    for s in range(0, input_ids.shape[0], batch_size):
        m = attention_mask[s : s + batch_size] if attention_mask is not None else None
        yield CalibrationBatch(input_ids[s : s + batch_size], m)

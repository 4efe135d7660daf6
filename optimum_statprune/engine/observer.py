"""Observation: forward hooks that feed each target's input statistics while a block runs.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable

import torch
from torch import nn

from ..config import StatPruneConfig
from ..methods import CHANNEL, HESSIAN
from ..tensor_math.stats import LayerStatistics
from .capture import Stop, call_block
from .targets import Target


class Observer:
    """Forward hooks that feed each target's ``LayerStatistics`` with the target's inputs.

    ``statistics`` (default: ``config.statistics``, what the method and the steps after its mask read)
    says which accumulators each target gets (``X^T X`` through ``GramAccumulator`` when the weight update
    reads it). Targets that read the very same input tensor (q/k/v, gate/up) share one, found on the
    first micro-batch, so their statistics are computed once. A token subsample is kept when a
    compensation will judge or fit on it."""

    def __init__(
        self,
        targets: list[Target],
        config: StatPruneConfig,
        device: torch.device,
        block_index: int,
        statistics: frozenset[str] | None = None,
    ):
        self.targets = targets
        self.stats: dict[str, LayerStatistics] = {}
        self.token_mask: torch.Tensor | None = None
        self.device = device
        statistics = config.statistics if statistics is None else statistics
        self.channel, self.hessian = CHANNEL in statistics, HESSIAN in statistics
        self.sample = config.sample_tokens if self.channel and config.resolved_compensation() != "none" else 0
        # The weight update reads X^T X through the fast GramAccumulator; a method's own Hessian (SparseGPT,
        # which refuses the update) keeps the HessianAccumulator it was measured with.
        self.fast_gram = config.resolve("update") != "none"
        # Distinct seeds per block so different layers do not keep the same token positions.
        self.seed = config.seed + 7919 * block_index
        # Global index of this process's first token (several processes: the tokens of the ranks before).
        self.index_offset = 0
        self._followers: set[str] = set()
        self._batch_inputs: dict[int, tuple[weakref.ref, str]] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._stop_after: set[int] | None = None
        self._seen: set[int] = set()
        # Global index of the current micro-batch's first real token, and the real tokens of the batch
        # (known once a hook has seen it): experts number their routed tokens by it (``_token_index``).
        self._base: int | torch.Tensor = 0
        self._batch_tokens: int | torch.Tensor = 0

    def _accumulator(self, name: str, dim: int) -> LayerStatistics:
        acc = self.stats.get(name)
        if acc is None:
            acc = LayerStatistics(dim, self.channel, self.hessian, self.sample, self.seed, self.device, self.fast_gram)
            if acc.channel is not None:
                acc.channel.index_offset = self.index_offset
            self.stats[name] = acc
        return acc

    def begin_batch(self, token_mask: torch.Tensor | None) -> None:
        """Set the padding mask of the micro-batch about to run; early stopping starts afresh."""
        self.token_mask = token_mask
        self._seen = set()
        self._batch_inputs = {}
        self._base = self._base + self._batch_tokens
        self._batch_tokens = 0

    def _token_index(self, n: int, mask: torch.Tensor | None, device: torch.device) -> torch.Tensor:
        """The global index of each of the micro-batch's ``n`` token rows (padding rows get their
        neighbour's, and are dropped by the caller): what one process would number them, whatever the
        share of batches this process runs. Stays on the device (no synchronisation)."""
        if mask is None:
            self._batch_tokens = n
            return self._base + torch.arange(n, device=device, dtype=torch.int64)
        running = mask.to(device=device, dtype=torch.int64).cumsum(0)
        self._batch_tokens = running[-1] if n else 0
        return self._base + running - 1

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
        self._base, self._batch_tokens = self.index_offset, 0  # every pass numbers the tokens afresh
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
                raise Stop

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
                    # a profiler's "statprune::statistics": what observing costs over the forward
                    with torch.profiler.record_function("statprune::statistics"):
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
            # global token indices pick the subsample; without one (no compensation) they are not needed
            index = self._token_index(hidden.shape[0], mask, hidden.device) if self.sample else None
            for e, ts in by_expert.items():
                routed = (top_k_index == e).any(dim=-1)
                if mask is not None:
                    routed = routed & mask
                x = hidden[routed]
                if x.shape[0] == 0:
                    continue
                routed_index = index[routed] if index is not None else None  # any split of the batches agrees
                if "gate_up_proj" in ts:
                    self._accumulator(ts["gate_up_proj"].name, x.shape[-1]).update(x, index=routed_index)
                if "down_proj" in ts:
                    gate_up = Target("", module, "expert", "gate_up_proj", e).weight()
                    h = module._apply_gate(nn.functional.linear(x, gate_up))
                    self._accumulator(ts["down_proj"].name, h.shape[-1]).update(h, index=routed_index)
            self._done(key)

        return hook


def observe(block, inputs, i, hidden, observer: Observer, targets=None, stop=False) -> None:
    """Run block ``i`` on every micro-batch with ``observer`` hooked on ``targets`` (default: all of its
    targets); with ``stop``, each pass ends once those targets have seen their input."""
    observer.attach(targets, stop_when_done=stop)
    try:
        for b, h in enumerate(hidden):
            observer.begin_batch(inputs.token_masks[b])
            with contextlib.suppress(Stop):
                call_block(block, inputs, i, b, h)
    finally:
        observer.detach()


def input_groups(block, inputs, i, hidden, targets: list[Target]) -> list[list[Target]]:
    """Targets grouped by the tensor they read (q/k/v share one input), in the order the block runs them.

    A tensor is recognised by identity while it lives (a weak reference), never by its address: the
    allocator hands a freed tensor's memory to the next one of the same size, and gate/up's input once
    took q/k/v's, which put gate/up in q/k/v's group, observed before attention was pruned, in some runs
    and not others."""
    order: list[tuple[int, Target]] = []
    read: list[weakref.ref] = []  # the inputs seen, in order; a group is an index into it
    handles = []
    by_module: dict[int, list[Target]] = {}
    for t in targets:
        by_module.setdefault(id(t.module), []).append(t)
    for ts in by_module.values():

        def hook(module, args, kwargs, ts=ts):
            x = args[0] if args else next(iter(kwargs.values()))
            group = next((g for g, ref in enumerate(read) if ref() is x), None)
            if group is None:
                group = len(read)
                read.append(weakref.ref(x))
            order.extend((group, t) for t in ts)

        handles.append(ts[0].module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        call_block(block, inputs, i, 0, hidden[0])
    finally:
        for h in handles:
            h.remove()
    groups: dict[int, list[Target]] = {}
    for group, t in order:
        if t not in groups.setdefault(group, []):
            groups[group].append(t)
    # Fused experts read the same tensor as their siblings only by accident; keep each module whole.
    return list(groups.values())

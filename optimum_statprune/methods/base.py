"""What a pruning method is, for the engine and the config: a name, the statistics it needs, its preset,
its own validation, and how it prunes one layer.

This module and the method declarations import no torch (the config, which ``optimum-cli`` imports on
every start, reads them); the tensor math is imported where a layer is pruned.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, NoReturn

if TYPE_CHECKING:
    import torch

    from ..config import StatPruneConfig
    from ..tensor_math.stats import LayerStatistics

# The statistics a method can ask for (the same names as ``tensor_math.stats.CHANNEL`` / ``HESSIAN``,
# repeated here so that declaring a method needs no torch).
CHANNEL = "channel"
"""Per-input-channel count, sum and sum of squares (and a token subsample): ``ChannelStats``."""
HESSIAN = "hessian"
"""The Gram matrix ``X^T X`` of the layer's input rows: ``HessianAccumulator``."""
STATISTICS = (CHANNEL, HESSIAN)


# --------------------------------------------------------------------------------------- validation
def invalid(name: str, value: Any, allowed: str) -> NoReturn:
    """Refuse ``StatPruneConfig.<name>=<value>``; the CLI turns this exact form into ``--flag value ...``."""
    raise ValueError(f"StatPruneConfig.{name}={value!r} is not valid: {allowed}.")


def is_real(value: Any) -> bool:
    """A finite real number that is not a bool."""
    return not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)


def check_real(config: Any, name: str, low: float | None = None, high: float | None = None,
               low_open: bool = False, high_open: bool = False, allowed: str | None = None,
               optional: bool = False) -> None:
    """``config.<name>`` is a finite real in the given bounds (None passes when ``optional``)."""
    value = getattr(config, name)
    if value is None and optional:
        return
    ok = is_real(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        invalid(name, value, allowed or "use a finite real number")


def check_int(config: Any, name: str, minimum: int = 1) -> None:
    """``config.<name>`` is an int (not a bool) ``>= minimum``."""
    value = getattr(config, name)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        invalid(name, value, "use a positive integer" if minimum == 1 else f"use an integer >= {minimum}")


def check_choice(config: Any, name: str, choices: Iterable[str], optional: bool = False) -> None:
    """``config.<name>`` is one of ``choices`` (None passes when ``optional``)."""
    value = getattr(config, name)
    choices = tuple(choices)
    if value is None and optional:
        return
    if not isinstance(value, str) or value not in choices:
        invalid(name, value, f"choose one of {', '.join(choices)}")


def check_bool(config: Any, name: str, optional: bool = False) -> None:
    value = getattr(config, name)
    if not (isinstance(value, bool) or (value is None and optional)):
        invalid(name, value, "use true or false")


# --------------------------------------------------------------------------------------- the method
@dataclass
class LayerPruned:
    """One layer pruned by a method: the new weight, its keep-mask and the method's record fields.

    ``weight`` is float32 ``[d_out, d_in]`` and zero wherever ``mask`` is False; methods that only select
    return ``original * mask``, methods that also update the survivors (SparseGPT) their updated weight."""

    weight: torch.Tensor
    mask: torch.Tensor
    record: dict[str, Any] = field(default_factory=dict)


class Method:
    """A selection method. Subclass it (or ``ScoreMethod``), give it a ``name``, and ``register`` an instance.

    - ``needs``: the input statistics ``prune_layer`` reads (``CHANNEL``, ``HESSIAN``); empty for none.
    - ``preset``: defaults of the preset fields (``config.PRESET_FIELDS``) when this method runs; fields
      left unset by the user take these, then the general defaults.
    - ``fields``: the config fields only this method reads; ``check_fields`` validates their values on
      every config (a bad value is wrong whichever method is chosen), ``validate`` checks the rules that
      hold only when this method runs (e.g. SparseGPT refuses a compensation).
    - ``updates_weights``: whether ``prune_layer`` changes surviving weights (then the config's
      compensation, which assumes ``original * mask``, and the config's weight update are refused).
    - ``column_factor``: how the weight update's gradual mask re-ranks weights in this method's score.
    """

    name: str = ""
    needs: frozenset[str] = frozenset()
    preset: Mapping[str, Any] = MappingProxyType({})
    fields: tuple[str, ...] = ()
    updates_weights: bool = False
    description: str = ""

    def check_fields(self, config: StatPruneConfig) -> None:
        """Validate the values of ``fields`` (runs for every registered method)."""

    def validate(self, config: StatPruneConfig) -> None:
        """Validate the cross-field rules that hold when this method is the one that runs."""
        if self.updates_weights and config.compensation not in (None, "none"):
            invalid("compensation", config.compensation,
                    f"{self.name} updates the surviving weights itself; use 'none'")

    def prune_layer(
        self, weight: torch.Tensor, stats: LayerStatistics | None, config: StatPruneConfig, sparsity: float,
        name: str = "",
    ) -> LayerPruned:
        """Prune ``weight`` (float32 ``[d_out, d_in]``, never modified) to ``sparsity`` (unstructured) or the
        config's N:M pattern, from the statistics in ``needs`` (``stats`` is None when ``needs`` is empty).
        ``name`` is the layer's, for messages."""
        raise NotImplementedError(f"{type(self).__name__} does not implement prune_layer")

    def column_factor(
        self, weight: torch.Tensor, stats: LayerStatistics | None, config: StatPruneConfig,
    ) -> torch.Tensor | None:
        """Per input column ``c_j`` (float32 ``[d_in]``, on the weight's device) such that this method ranks
        the weights of a row like ``|W_ij| * c_j``, or None where its score has no such form.

        The weight update's gradual mask (``update_mask_steps``) re-chooses the mask from the updated
        weights during its first iterations; with a factor it ranks them in this method's own score, so
        the mask stays the method's. With None it ranks by ``|W_ij| * ||X_j||`` (Wanda's score, the
        update's natural scale). ``stats`` holds the method's statistics (and the update's ``X^T X``)."""
        return None

    def __repr__(self) -> str:
        return f"<method {self.name!r}>"


class ScoreMethod(Method):
    """A method that only ranks weights: ``score`` (higher = kept), then the config's pattern picks the mask.

    Ties break toward pruning the lower index; NaN scores rank lowest (``tensor_math.masks``)."""

    def score(self, weight: torch.Tensor, stats: LayerStatistics | None, config: StatPruneConfig) -> torch.Tensor:
        """Importance of every weight, shaped like ``weight``."""
        raise NotImplementedError(f"{type(self).__name__} does not implement score")

    def prune_layer(
        self, weight: torch.Tensor, stats: LayerStatistics | None, config: StatPruneConfig, sparsity: float,
        name: str = "",
    ) -> LayerPruned:
        from ..tensor_math.masks import make_mask

        mask = make_mask(self.score(weight, stats, config), sparsity, config.pattern, config.group)
        return LayerPruned(weight * mask, mask)


def channel_stats(stats: LayerStatistics | None, method: str):
    """The ``ChannelStats`` a method declared it needs; a clear error if the engine did not provide them."""
    if stats is None or stats.channel is None:
        raise ValueError(f"{method} needs per-channel activation statistics of the layer's input")
    return stats.channel

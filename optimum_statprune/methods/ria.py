"""RIA (Zhang et al., 2024): relative importance ``|W|/row sum + |W|/column sum`` times ``||X_j||^a``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import register
from .base import CHANNEL, ScoreMethod, channel_stats, check_real

if TYPE_CHECKING:
    import torch


class RIA(ScoreMethod):
    name = "ria"
    needs = frozenset({CHANNEL})
    fields = ("ria_power",)
    description = "relative importance x activation power"

    def check_fields(self, config) -> None:
        check_real(config, "ria_power")

    def score(self, weight, stats, config) -> torch.Tensor:
        from ..tensor_math.scores import ria_score

        return ria_score(weight, channel_stats(stats, self.name), config.ria_power)

    def column_factor(self, weight, stats, config) -> torch.Tensor:
        """The activation part ``||X_j||^a`` only: the relative-importance term divides by row and column
        sums of ``|W|``, which the update changes, so it is not a fixed per-column factor. Re-ranking by the
        activation part gave the best results of all on protocol A
        (benchmarks/results/update-protocolA-h200.md)."""
        import torch

        return channel_stats(stats, self.name).norm.pow(config.ria_power).to(weight.device, torch.float32)


register(RIA())

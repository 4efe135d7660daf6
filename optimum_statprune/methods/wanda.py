"""Wanda (Sun et al., 2023): ``|W_ij| * ||X_j||_2``, compared per output row by default."""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import register
from .base import CHANNEL, ScoreMethod, channel_stats

if TYPE_CHECKING:
    import torch


class Wanda(ScoreMethod):
    name = "wanda"
    needs = frozenset({CHANNEL})
    description = "|W| * ||X_j||_2"

    def score(self, weight, stats, config) -> torch.Tensor:
        from ..tensor_math.scores import wanda_score

        return wanda_score(weight, channel_stats(stats, self.name))

    def column_factor(self, weight, stats, config) -> torch.Tensor:
        import torch

        return channel_stats(stats, self.name).norm.to(weight.device, torch.float32)


register(Wanda())

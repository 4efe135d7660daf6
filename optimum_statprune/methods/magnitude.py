"""Magnitude pruning: keep the largest ``|W_ij|``. Needs no calibration data."""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import register
from .base import ScoreMethod

if TYPE_CHECKING:
    import torch


class Magnitude(ScoreMethod):
    name = "magnitude"
    description = "|W|: no calibration data"

    def score(self, weight, stats, config) -> torch.Tensor:
        from ..tensor_math.scores import magnitude_score

        return magnitude_score(weight)

    def column_factor(self, weight, stats, config) -> torch.Tensor:
        import torch

        return torch.ones(weight.shape[1], dtype=torch.float32, device=weight.device)


register(Magnitude())

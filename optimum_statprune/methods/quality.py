"""``quality``: the best-quality preset. RIA's mask, then the ADMM weight update with a gradual mask.

Each linear is pruned by RIA's score (``methods/ria.py``), then its surviving weights are refitted
against the calibration inputs' ``X^T X`` (``update="admm"``, 20 iterations, damping 0.1, rho 1), and the
first 15 iterations re-choose the mask from the refitted weights ranked by RIA's activation part
``|W_ij| * ||X_j||^a`` (``update_mask_steps=15``), keeping exact counts or N:M groups. On protocol A this
was the best of every mask method with and without the update: 42.93 / 76.68 / 64.12 / 87.99 at
50% / 60% / 4:8 / 2:4 against SparseGPT's 49.96 / 102.85 / 73.96 / 109.88
(benchmarks/results/update-protocolA-h200.md, docs/results.md "Weight update").

It costs an ``X^T X`` per input and one Cholesky inverse plus 22 matmuls per linear (about 0.6 s per
Llama-2-7B block on an H200 against SparseGPT's 3.9 s); ``statprune`` stays the fast preset (no update).
Choose ``quality`` when quality matters, and always for N:M patterns (2:4, 4:8), where the update gains
most. Every field of the preset can be overridden (``update_mask_steps=0`` holds RIA's mask fixed).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

from . import register
from .ria import RIA

QUALITY_PRESET: Mapping[str, Any] = MappingProxyType({
    "update": "admm",
    "update_mask_steps": 15,
})


class Quality(RIA):
    name = "quality"
    preset = QUALITY_PRESET
    description = "RIA's mask + ADMM weight update with a gradual mask (best quality; slower than statprune)"


register(Quality())

"""CVR, the paper's selection step: ``|W_ij| * A_j^(p/2) * (sigma^2_W + eps)^(-alpha/2)``.

Two presets of one score: ``cvr`` is the paper's formula as written (``A = Var(x)``, ``p = 1/2``,
``alpha = 1``, no compensation: the general defaults); ``statprune`` is what the protocol-A sweep chose
(docs/results.md, benchmarks/sweep.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from . import register
from .base import CHANNEL, ScoreMethod, channel_stats, check_choice, check_real

if TYPE_CHECKING:
    import torch

WEIGHT_STAT_AXES = ("column", "row")
ACTIVATION_STATS = ("variance", "second_moment")

# protocol A, 50% unstructured: 50.74 against Wanda's 52.32 and SparseGPT's 49.96 (docs/results.md)
STATPRUNE_PRESET: Mapping[str, Any] = MappingProxyType({
    "alpha": 0.5,
    "activation_stat": "second_moment",
    "activation_power": 1.0,
    "weight_stat_axis": "column",
    "compensation": "ec-activation",
    "safety_check": True,
    "safety_scope": "layer",
})


class CVR(ScoreMethod):
    needs = frozenset({CHANNEL})
    fields = ("alpha", "eps", "weight_stat_axis", "activation_stat", "activation_power")

    def __init__(self, name: str, preset: Mapping[str, Any], description: str):
        self.name = name
        self.preset = MappingProxyType(dict(preset))
        self.description = description

    def check_fields(self, config) -> None:
        check_real(config, "alpha", low=0, allowed="use a finite number >= 0", optional=True)
        check_real(config, "eps", low=0, low_open=True, allowed="use a positive number such as 1e-8")
        check_real(config, "activation_power", low=0, optional=True,
                   allowed="use a finite number >= 0 (1/2: the paper's Var(x)^(1/4))")
        check_choice(config, "weight_stat_axis", WEIGHT_STAT_AXES, optional=True)
        check_choice(config, "activation_stat", ACTIVATION_STATS, optional=True)

    def score(self, weight, stats, config) -> torch.Tensor:
        from ..tensor_math.scores import cvr_score

        return cvr_score(
            weight, channel_stats(stats, self.name), config.resolve("alpha"), config.eps,
            config.resolve("weight_stat_axis"), config.resolve("activation_stat"), config.resolve("activation_power"),
        )

    def column_factor(self, weight, stats, config) -> torch.Tensor:
        """``A_j^(p/2) (sigma_W(j)^2 + eps)^(-alpha/2)``, the dispersion of the dense weight's columns: exact
        for ``weight_stat_axis="column"``. With ``"row"`` the activation part only (a per-row factor does
        not change the ranking inside a row; with ``group="layer"`` this is an approximation)."""
        import torch

        from ..tensor_math.scores import weight_dispersion

        ch = channel_stats(stats, self.name)
        a = ch.variance if config.resolve("activation_stat") == "variance" else ch.second_moment
        c = a.pow(config.resolve("activation_power") / 2).to(weight.device, torch.float32)
        if config.resolve("weight_stat_axis") == "column":
            c = c * (weight_dispersion(weight, "column") + config.eps).pow(-config.resolve("alpha") / 2)
        return c


register(CVR("cvr", {}, "the paper's variance-calibrated score"))
register(CVR("statprune", STATPRUNE_PRESET, "CVR as tuned on protocol A, with activation-energy compensation"))

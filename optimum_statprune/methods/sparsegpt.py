"""SparseGPT (Frantar & Alistarh, 2023): OBS updates of the surviving weights from ``H = 2/n X^T X``.

Its options are config fields it validates itself: ``sparsegpt_blocksize`` (columns per lazy-update
block), ``sparsegpt_damp`` (dampening relative to ``mean(diag(H))``), and two experimental ones
(``tensor_math/sparsegpt.py`` explains them): ``sparsegpt_allocation`` ("even", the faithful default, or
"lookahead") and ``sparsegpt_sweep`` ("columns", the default, or "solve", one batched triangular solve
per block, for GPUs).
"""

from __future__ import annotations

import logging

from . import register
from .base import HESSIAN, LayerPruned, Method, check_choice, check_int, check_real, invalid

logger = logging.getLogger(__name__)

ALLOCATIONS = ("even", "lookahead")
SWEEPS = ("columns", "solve")


class SparseGPT(Method):
    name = "sparsegpt"
    needs = frozenset({HESSIAN})
    fields = ("sparsegpt_blocksize", "sparsegpt_damp", "sparsegpt_allocation", "sparsegpt_sweep")
    updates_weights = True
    description = "OBS weight updates from X^T X"

    def check_fields(self, config) -> None:
        check_int(config, "sparsegpt_blocksize")
        check_real(config, "sparsegpt_damp", low=0, high=1, low_open=True, high_open=True,
                   allowed="use a fraction of mean(diag(H)) in (0, 1), e.g. 0.01")
        check_choice(config, "sparsegpt_allocation", ALLOCATIONS)
        check_choice(config, "sparsegpt_sweep", SWEEPS)

    def validate(self, config) -> None:
        super().validate(config)
        nm = config.nm
        if nm is not None and config.sparsegpt_blocksize % nm[1]:
            invalid("sparsegpt_blocksize", config.sparsegpt_blocksize,
                    f"with pattern {config.pattern} use a multiple of {nm[1]} so no N:M group straddles two blocks")

    def prune_layer(self, weight, stats, config, sparsity, name="") -> LayerPruned:
        from ..tensor_math.sparsegpt import sparsegpt_prune

        if stats is None or stats.hessian is None:
            raise ValueError("sparsegpt needs the Hessian X^T X of the layer's input")
        result = sparsegpt_prune(
            weight, stats.hessian.hessian(), sparsity, config.pattern, blocksize=config.sparsegpt_blocksize,
            percdamp=config.sparsegpt_damp, group=config.group, allocation=config.sparsegpt_allocation,
            sweep=config.sparsegpt_sweep,
        )
        record = {"percdamp": result.percdamp, "retries": result.retries, "error": result.error}
        if result.retries:
            logger.warning("%s: Cholesky needed %d retries (dampening %.3g)", name, result.retries, result.percdamp)
        return LayerPruned(result.weight, result.mask, {"sparsegpt": record})


register(SparseGPT())

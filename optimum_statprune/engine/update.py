"""The weight update after the mask (``StatPruneConfig.update``), whatever method chose the mask.

``"admm"`` refits the surviving weights of a linear against its calibration inputs' ``X^T X``
(``tensor_math.weight_update.masked_reconstruction``: masked least squares with a ridge toward the dense
weight, all rows at once). With ``update_mask_steps > 0`` the first iterations re-choose the mask from the
updated weights, ranked in the method's own score (``Method.column_factor``), with the layer's exact
counts (its OWL sparsity, per row or per layer) or exact N:M groups. Pruned weights are never revived:
the result is zero outside the returned mask.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from ..config import StatPruneConfig
from ..methods import LayerPruned, Method
from ..tensor_math.stats import LayerStatistics
from ..tensor_math.weight_update import GradualMask, masked_reconstruction

logger = logging.getLogger(__name__)


def update_layer(
    name: str,
    w0: torch.Tensor,
    pruned: LayerPruned,
    stats: LayerStatistics,
    config: StatPruneConfig,
    method: Method,
    sparsity: float,
) -> tuple[LayerPruned, dict[str, Any]]:
    """Refit ``pruned`` (the method's mask of the dense ``w0``) with the config's update; return the new
    weight and mask, and the manifest record (damping used, retries, iterations, output errors of the
    mask-only and the updated weight on the calibration tokens).

    Where no dampening makes the system solvable (``max_retries`` tenfold raises) the method's weight is
    kept, a warning is logged and the record says why: a run of hours is not lost to one layer."""
    kind = config.resolve("update")
    steps = config.resolve("update_mask_steps")
    schedule, ranking = None, None
    if steps:
        factor = method.column_factor(w0, stats, config)
        schedule = GradualMask(sparsity, config.pattern, config.group, steps=steps, column_factor=factor)
        ranking = method.name if factor is not None else f"|W| * ||X_j|| ({method.name} has no column factor)"
    try:
        result = masked_reconstruction(
            w0, pruned.mask, stats.hessian.xtx, damp=config.update_damp, rho=config.update_rho,
            iters=config.update_iters, mask_schedule=schedule, tf32=config.update_tf32 and w0.is_cuda,
        )
    except torch.linalg.LinAlgError as e:
        logger.warning("%s: weight update skipped, the method's weights kept: %s", name, e)
        return pruned, {"kind": kind, "applied": False, "reason": str(e)}
    if result.retries:
        logger.warning("%s: weight update needed %d retries (dampening raised to %.3g)", name, result.retries,
                       result.damp)
    record: dict[str, Any] = {"kind": kind, "applied": True, "rho": config.update_rho, "mask_steps": steps,
                              **result.record()}
    if ranking is not None:
        record["mask_ranking"] = ranking
    return LayerPruned(result.weight, result.mask, pruned.record), record

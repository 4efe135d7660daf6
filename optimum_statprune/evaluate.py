"""Evaluation: perplexity on token windows, a sparsity report of the targeted weights, an lm-eval bridge.

Perplexity follows the SparseGPT/Wanda protocol: every window is scored on its own (no context from
the previous window), the labels are the window shifted by one, so a window of ``L`` tokens gives
``L - 1`` predictions, and the result is ``exp(sum of token NLL / number of predicted tokens)`` over
all windows. Per-token NLLs come from float32 log-softmax and are summed in float64, so the number
does not depend on the batch size beyond float32 rounding of the logits.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .engine.distributed import DistContext
from .engine.targets import Target, find_blocks, find_targets

logger = logging.getLogger(__name__)

def _input_device(model: nn.Module) -> torch.device:
    """Where input ids must go: the input embedding's device (right for accelerate-dispatched models)."""
    get_emb = getattr(model, "get_input_embeddings", None)
    if callable(get_emb):
        try:
            emb = get_emb()
        except NotImplementedError:
            emb = None
        if emb is not None and getattr(emb, "weight", None) is not None and emb.weight.device.type != "meta":
            return emb.weight.device
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def perplexity(
    model: nn.Module,
    windows: torch.Tensor,
    batch_size: int = 1,
    device: str | torch.device | None = None,
    *,
    disable_progress: bool = False,
    dist: DistContext | None = None,
) -> float:
    """``exp(mean token NLL)`` of a causal LM over ``windows`` (``[n, seqlen]`` token ids).

    Each window is scored independently and shifted inside itself: ``seqlen - 1`` predictions per
    window, ``n * (seqlen - 1)`` in total. The model is not moved; ``device`` (default: where the input
    embedding lives) is where the ids are sent. Runs under ``torch.inference_mode`` in eval mode and
    restores the previous training mode afterwards.

    With several processes (``dist``), each rank scores a contiguous share of the windows and the NLL sums
    are added over the ranks, so every rank returns the same number, equal to one process's up to the
    order of the float64 additions.
    """
    if not isinstance(windows, torch.Tensor) or windows.dim() != 2:
        raise ValueError("perplexity: windows must be a 2-D tensor [n_windows, seqlen] of token ids.")
    if windows.is_floating_point():
        raise ValueError(f"perplexity: windows must hold integer token ids, got {windows.dtype}.")
    n, seqlen = windows.shape
    if n == 0 or seqlen < 2:
        raise ValueError(
            f"perplexity: need at least one window of >= 2 tokens, got shape {tuple(windows.shape)}."
        )
    if batch_size < 1:
        raise ValueError(f"perplexity: batch_size must be >= 1, got {batch_size}.")
    target = torch.device(device) if device is not None else _input_device(model)
    dist = dist if dist is not None else DistContext()
    mine = dist.part(n)

    was_training = model.training
    model.eval()
    nll_sum = 0.0  # Python float: float64 accumulation across batches
    count = 0
    try:
        with (
            torch.inference_mode(),
            tqdm(total=len(mine), desc="perplexity", unit="window", disable=disable_progress or not dist.is_main) as bar,
        ):
            for start in range(mine.start, mine.stop, batch_size):
                ids = windows[start : min(start + batch_size, mine.stop)].to(target, dtype=torch.long)
                out = model(input_ids=ids, use_cache=False)
                logits = out.logits if hasattr(out, "logits") else out[0]
                shift_logits = logits[:, :-1, :].float()
                labels = ids[:, 1:].to(shift_logits.device)
                token_nll = F.cross_entropy(
                    shift_logits.reshape(-1, shift_logits.shape[-1]), labels.reshape(-1), reduction="none"
                )
                nll_sum += token_nll.double().sum().item()
                count += labels.numel()
                bar.update(ids.shape[0])
    finally:
        model.train(was_training)
    if dist.active:
        nll_sum, count = dist.all_sum(nll_sum), round(dist.all_sum(float(count)))

    mean_nll = nll_sum / count
    if not math.isfinite(mean_nll):
        logger.warning("perplexity: the mean NLL is %s (non-finite logits?)", mean_nll)
    try:
        return math.exp(mean_nll)
    except OverflowError:
        return math.inf


def targeted_weights(
    model: nn.Module, targets: list[str] | None = None, ignore: list[str] | None = None, blocks: str | None = None
) -> dict[str, Target]:
    """The weights pruning targets, by the names the manifest records: the one definition
    (``engine.targets.find_targets``) over every decoder block, so routers are left out and each fused
    expert counts once per expert and projection. ``targets``/``ignore``/``blocks`` as in the config."""
    path, block_list = find_blocks(model, blocks)
    found: dict[str, Target] = {}
    for i, block in enumerate(block_list):
        for t in find_targets(block, f"{path}.{i}", targets, ignore):
            found[t.name] = t
    return found


def sparsity_report(
    model: nn.Module, targets: list[str] | None = None, ignore: list[str] | None = None, blocks: str | None = None
) -> dict[str, Any]:
    """Zeros, total and sparsity per targeted weight (``targeted_weights``) and over all of them, so the
    figure is comparable with the manifest's summary of a model pruned with the same targets.

    Returns ``{"layers": {name: {"zeros", "total", "sparsity"}}, "zeros", "total", "sparsity"}``;
    counts are exact integers (weights on the meta device are skipped with a warning).
    """
    layers: dict[str, dict[str, float | int]] = {}
    zeros_total = 0
    numel_total = 0
    with torch.no_grad():
        for name, target in targeted_weights(model, targets, ignore, blocks).items():
            weight = target.stored()
            if weight.device.type == "meta":
                logger.warning("sparsity_report: %s has no data (meta device); skipped", name)
                continue
            zeros = int((weight == 0).sum().item())
            total = weight.numel()
            layers[name] = {"zeros": zeros, "total": total, "sparsity": zeros / total if total else 0.0}
            zeros_total += zeros
            numel_total += total
    return {
        "layers": layers,
        "zeros": zeros_total,
        "total": numel_total,
        "sparsity": zeros_total / numel_total if numel_total else 0.0,
    }


def lm_eval_bridge(
    model: nn.Module,
    tokenizer: Any,
    tasks: str | list[str],
    *,
    batch_size: int | str = 1,
    hflm_kwargs: dict[str, Any] | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Run lm-evaluation-harness tasks on an in-memory model (e.g. right after pruning, before saving).

    ``lm_eval`` is optional and imported here only. ``hflm_kwargs`` go to ``HFLM``; other keyword
    arguments (``num_fewshot``, ``limit``, ...) go to ``lm_eval.simple_evaluate``.
    """
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
    except ImportError as exc:
        raise ImportError(
            "lm_eval_bridge needs the lm-evaluation-harness, which is not installed: pip install lm-eval"
        ) from exc
    task_list = [tasks] if isinstance(tasks, str) else list(tasks)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, **(hflm_kwargs or {}))
    return lm_eval.simple_evaluate(model=lm, tasks=task_list, **kwargs)

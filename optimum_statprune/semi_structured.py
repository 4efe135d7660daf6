"""Run a 2:4-pruned model on sparse tensor cores: its block linears as ``torch.sparse`` semi-structured tensors.

Opt-in, and measure before you use it: on an H200 with torch 2.11 (cuSPARSELt) a converted Llama-2-7B-shaped
model was not faster than dense fp16: prefill of 8 x 2048 tokens took 1.08x dense's time, one sequence 2.7x
eager (1.15x replayed from a CUDA graph), decode 4.0-4.4x, although single graph-replayed sparse matmuls of
2048+ tokens beat dense by 15-30% (docs/performance.md, ``benchmarks/semi_structured.py``): the row-major
copy of the result that the model needs costs about what the kernel saves. Other stacks differ. The
conversion is exact: the same products, from the compressed weight.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .engine.targets import find_blocks

logger = logging.getLogger(__name__)

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16)


def is_two_four(weight: torch.Tensor) -> bool:
    """True when every group of 4 consecutive inputs of every row holds at most 2 nonzeros."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        return False
    nonzero = (weight.reshape(weight.shape[0], -1, 4) != 0).sum(-1)
    return bool((nonzero <= 2).all())


class SemiStructuredLinear(nn.Linear):
    """An ``nn.Linear`` whose weight is semi-structured: one row per token in, a row-major result out.

    The sparse tensor's ``linear`` takes 2-D inputs; a ``[batch, tokens, features]`` input otherwise goes
    through ``matmul``'s broadcasting, which the sparse tensor refuses (``expand``) for batched decode.
    Its result is the transpose of ``W @ x.T``, a column-major view; everything after the linear
    (attention's reshapes, the residual adds) expects row-major tensors, so the result is made contiguous
    here, one copy of the output."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = nn.functional.linear(x.reshape(-1, x.shape[-1]), self.weight, self.bias).contiguous()
        return out.reshape(*x.shape[:-1], out.shape[-1])


def to_semi_structured(model: nn.Module, blocks: str | None = None) -> list[str]:
    """Replace the weight of every ``nn.Linear`` inside the decoder blocks that is 2:4 sparse with its
    semi-structured form, in place; return the converted module names.

    The model must be on a CUDA device in float16 or bfloat16. Linears that are not 2:4 (or whose shape the
    kernel refuses) stay dense and are logged. Embeddings and ``lm_head`` are outside the blocks and never
    touched. Inference only: semi-structured weights take no gradients."""
    from torch.sparse import to_sparse_semi_structured

    blocks_path, block_list = find_blocks(model, blocks)
    converted: list[str] = []
    for i, block in enumerate(block_list):
        for name, module in block.named_modules():
            if type(module) is not nn.Linear:  # subclasses may have their own forward, which we must not replace
                continue
            full = f"{blocks_path}.{i}.{name}"
            weight = module.weight
            if weight.device.type != "cuda" or weight.dtype not in SUPPORTED_DTYPES:
                raise ValueError(
                    f"{full} is {weight.dtype} on {weight.device}: semi-structured kernels need float16 or bfloat16 "
                    "on a CUDA device; load the model with dtype=torch.float16 and device_map='cuda'"
                )
            if not is_two_four(weight):
                logger.info("%s is not 2:4 sparse; kept dense", full)
                continue
            try:
                sparse = to_sparse_semi_structured(weight.detach())
            except (RuntimeError, ValueError) as e:  # a shape the kernel does not take
                logger.info("%s kept dense: %s", full, str(e).splitlines()[0])
                continue
            module.weight = nn.Parameter(sparse, requires_grad=False)
            module.__class__ = SemiStructuredLinear
            converted.append(full)
    if not converted:
        raise ValueError("no 2:4-sparse linear found in the decoder blocks; prune with pattern='2:4' first")
    logger.warning(
        "converted %d linears to 2:4 semi-structured weights. On an H200 with torch 2.11 a converted 7B model was "
        "not faster than dense (prefill 1.08-2.7x, decode 4.0-4.4x its time); time your workload "
        "(benchmarks/semi_structured.py) before relying on it",
        len(converted),
    )
    return converted

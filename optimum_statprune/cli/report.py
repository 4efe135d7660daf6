"""What the commands print and write: number formats, the markdown table, the bar chart, JSON files.

Files are written with ``checkpoint.atomic`` (a temporary file renamed into place, permissions from
the umask), so an interrupted run never leaves half a JSON or PNG behind.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

from .errors import CLIError
from .names import MATPLOTLIB_PIP


def fmt_ppl(value: float | None) -> str:
    """A perplexity for people: two decimals, or three significant digits when huge."""
    if value is None:
        return "-"
    if not math.isfinite(value):
        return str(value)
    return f"{value:.2f}" if value < 1e5 else f"{value:.3g}"


def fmt_count(n: int) -> str:
    """``134_515_008`` -> ``134.5M``."""
    for div, unit in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return str(n)


def report_totals(layers: list[dict[str, Any]]) -> dict[str, Any]:
    """Linear layers, weights and overall sparsity of a pruning report's layer records."""
    total = sum(math.prod(rec["shape"]) for rec in layers)
    zeros = sum(rec["sparsity"] * math.prod(rec["shape"]) for rec in layers)
    return {"layers": len(layers), "weights": total, "sparsity": zeros / total if total else 0.0}


def _write_bytes(path: str, data: bytes) -> None:
    from ..checkpoint.atomic import atomic_write_bytes

    p = Path(path).expanduser()
    p.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(p, data)


def write_json(path: str, data: dict[str, Any]) -> None:
    """``data`` as indented JSON (anything not JSON-native as its ``str``)."""
    _write_bytes(path, (json.dumps(data, indent=2, default=str) + "\n").encode("utf-8"))


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """``compare``'s rows as a markdown table (an error replaces the perplexity of a failed run)."""
    lines = ["| method | pattern | perplexity | sparsity | seconds |", "| --- | --- | ---: | ---: | ---: |"]
    for r in rows:
        sparsity = "-" if r.get("sparsity") is None else f"{r['sparsity']:.2%}"
        seconds = "-" if r.get("seconds") is None else f"{r['seconds']:.1f}"
        ppl = fmt_ppl(r.get("perplexity")) if not r.get("error") else f"error: {r['error'][:60]}"
        lines.append(f"| {r['method']} | {r['pattern'] or '-'} | {ppl} | {sparsity} | {seconds} |")
    return "\n".join(lines)


def write_png(rows: list[dict[str, Any]], path: str, title: str) -> None:
    """Grouped bars: perplexity per method, one bar per pattern, the dense perplexity as a line."""
    try:
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise CLIError(f"--png needs matplotlib, which is not installed: {MATPLOTLIB_PIP}") from exc

    dense = next((r["perplexity"] for r in rows if r["method"] == "dense"), None)
    runs = [r for r in rows if r["method"] != "dense"]
    methods = list(dict.fromkeys(r["method"] for r in runs))
    patterns = list(dict.fromkeys(r["pattern"] for r in runs))
    values = {(r["method"], r["pattern"]): r.get("perplexity") for r in runs}
    finite = [v for v in values.values() if v is not None and math.isfinite(v)] + ([dense] if dense else [])

    fig = Figure(figsize=(max(6.0, 1.3 * len(methods) * max(1, len(patterns)) / 1.5), 4.5), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / max(1, len(patterns))
    for j, pattern in enumerate(patterns):
        xs = [i + (j - (len(patterns) - 1) / 2) * width for i in range(len(methods))]
        heights = [values.get((m, pattern)) for m in methods]
        heights = [h if h is not None and math.isfinite(h) else 0.0 for h in heights]
        bars = ax.bar(xs, heights, width, label=pattern)
        ax.bar_label(bars, labels=[fmt_ppl(h) if h else "n/a" for h in heights], fontsize=7, padding=2)
    if dense:
        ax.axhline(dense, color="black", linestyle="--", linewidth=1, label=f"dense {fmt_ppl(dense)}")
    if finite and max(finite) / max(min(finite), 1e-9) > 20:
        ax.set_yscale("log")
    ax.set_xticks(range(len(methods)), methods)
    ax.set_ylabel("perplexity (lower is better)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8, title="pattern", title_fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    _write_bytes(path, buffer.getvalue())

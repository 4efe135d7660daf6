"""Sparsity patterns and sparsity values: the one place that says what they are and which are valid.

A pattern is ``"unstructured"`` or ``"N:M"`` (``N`` weights kept in every ``M`` consecutive inputs,
``0 < N < M``). With an N:M pattern the pruned fraction is fixed by the pattern, ``1 - N/M``, so a
sparsity set beside it must agree with it. The default sparsity (0.5) stands for "not set": beside an
N:M pattern it means ``1 - N/M`` (``resolve_sparsity``), so ``StatPruneConfig(pattern="1:4")`` works and
prunes 75%, while ``pattern="2:4", sparsity=0.9`` is refused. (An explicit 0.5 beside ``1:4`` cannot be
told from the default and is read the same way.) Everything here is plain Python (no torch), so the config can use it without
importing torch.
"""

from __future__ import annotations

import math
import numbers
import re

UNSTRUCTURED = "unstructured"
DEFAULT_SPARSITY = 0.5
"""The config's default sparsity: what unstructured pruning prunes unless told otherwise, and "not set"
beside an N:M pattern."""

_NM_RE = re.compile(r"^(\d+):(\d+)$")
# Two sparsities closer than this are the same (1 - N/M as a float, typed back by a user).
_SPARSITY_TOLERANCE = 1e-9


class PatternError(ValueError):
    """A pattern that is neither 'unstructured' nor a valid 'N:M'."""


class SparsityError(ValueError):
    """A sparsity that is not a fraction in the allowed range, or that contradicts an N:M pattern."""


def check_nm(n: int, m: int) -> tuple[int, int]:
    """``(n, m)`` if ``0 < n < m``; else ``PatternError``."""
    if not 0 < n < m:
        raise PatternError(f"N:M needs 0 < N < M (N weights kept in every group of M), got {n}:{m}")
    return n, m


def parse_pattern(pattern: object) -> tuple[int, int] | None:
    """``(N, M)`` for ``"N:M"``, None for ``"unstructured"``; ``PatternError`` for anything else."""
    if pattern == UNSTRUCTURED:
        return None
    match = _NM_RE.match(pattern) if isinstance(pattern, str) else None
    if match is None:
        raise PatternError(f"pattern must be 'unstructured' or 'N:M' such as '2:4', got {pattern!r}")
    return check_nm(int(match.group(1)), int(match.group(2)))


def pattern_sparsity(pattern: str) -> float | None:
    """The fraction an N:M pattern prunes, ``1 - N/M``; None for unstructured."""
    nm = parse_pattern(pattern)
    return None if nm is None else 1.0 - nm[0] / nm[1]


def check_nm_width(d_in: int, n: int, m: int) -> None:
    """An N:M pattern groups ``m`` consecutive inputs, so the input width must be a multiple of ``m``."""
    if d_in % m:
        raise PatternError(
            f"the {n}:{m} pattern needs the input width to be a multiple of {m}; this layer has {d_in} inputs "
            f"(exclude it with `ignore` or use an unstructured pattern)"
        )


def sparsity_problem(value: object, low: float = 0.0, high: float = 1.0, closed: bool = False) -> str | None:
    """Why ``value`` is not a valid sparsity in ``(low, high)`` (``[low, high]`` when ``closed``), or None.

    The one rule for every sparsity: a real, finite number (not a bool) in the range. A user's sparsity is
    checked on the open interval (0 and 1 prune nothing or everything); a sparsity computed for one
    layer (OWL's allocation, a mask) on the closed one."""
    bounds = f"in [{low:g}, {high:g}]" if closed else f"strictly between {low:g} and {high:g}"
    real = not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)
    if not real or not (low <= value <= high if closed else low < value < high):  # type: ignore[operator]
        return f"a sparsity must lie {bounds} (a finite fraction pruned, e.g. {DEFAULT_SPARSITY})"
    return None


def check_sparsity(
    value: object, what: str = "sparsity", low: float = 0.0, high: float = 1.0, closed: bool = False
) -> float:
    """``value`` as a float if ``sparsity_problem`` finds nothing wrong; else ``SparsityError``."""
    problem = sparsity_problem(value, low, high, closed)
    if problem is not None:
        raise SparsityError(f"{what}={value!r} is not valid: {problem}")
    return float(value)  # type: ignore[arg-type]


def pattern_conflict(sparsity: float | None, pattern: str) -> str | None:
    """Why ``sparsity`` cannot go with ``pattern``, or None. An N:M pattern prunes exactly ``1 - N/M``; a
    sparsity beside it other than that or the default would be recorded but not run (``2:4`` with ``0.9``
    prunes 50%), so it is refused rather than ignored."""
    implied = pattern_sparsity(pattern)
    if implied is None or sparsity is None or sparsity == DEFAULT_SPARSITY:
        return None
    if abs(sparsity - implied) <= _SPARSITY_TOLERANCE:
        return None
    return (
        f"a {pattern} pattern prunes exactly 1 - {pattern.replace(':', '/')} = {implied:g} of the weights; "
        f"leave sparsity at its default or set it to {implied:g}"
    )


def resolve_sparsity(sparsity: float | None, pattern: str) -> float:
    """The fraction a run prunes: the pattern's ``1 - N/M`` for N:M (a ``sparsity`` other than that or the
    default is refused), else ``sparsity`` (None: ``DEFAULT_SPARSITY``). ``SparsityError`` if invalid."""
    value = DEFAULT_SPARSITY if sparsity is None else check_sparsity(sparsity)
    conflict = pattern_conflict(value, pattern)
    if conflict is not None:
        raise SparsityError(f"sparsity={sparsity!r} is not valid: {conflict}")
    implied = pattern_sparsity(pattern)
    return value if implied is None else implied

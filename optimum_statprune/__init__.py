"""optimum-statprune: post-training pruning of causal LMs from first-order statistics.

``StatPruner`` and ``SparsityPreservingCallback`` are imported on first use: Optimum's command line
imports this package on every start, and must not pay for torch and transformers each time.
"""

from typing import TYPE_CHECKING

from .config import StatPruneConfig

__version__ = "0.1.0"

__all__ = ["SparsityPreservingCallback", "StatPruneConfig", "StatPruner", "__version__"]

if TYPE_CHECKING:
    from .pruner import StatPruner
    from .training import SparsityPreservingCallback


def __getattr__(name: str):
    if name == "StatPruner":
        from .pruner import StatPruner

        return StatPruner
    if name == "SparsityPreservingCallback":
        from .training import SparsityPreservingCallback

        return SparsityPreservingCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""optimum-statprune: post-training pruning of causal LMs from first-order statistics."""

from .config import StatPruneConfig
from .pruner import StatPruner

__version__ = "0.1.0"

__all__ = ["StatPruneConfig", "StatPruner", "__version__"]

"""The method registry: every selection method, one module each, found by name.

A method module defines a ``Method`` (usually a ``ScoreMethod``) and calls ``register`` on an instance
at import. Every module of this package is imported here, the built-in ones first in a fixed order (the
order the CLI lists them in), then any other module in alphabetical order, so adding a method is one new
file in this folder (plus its tests); modules whose names start with ``_`` (and ``base``) are helpers, not
methods. Code outside the package can ``register`` its own too. The config
takes its method list and presets from here, the engine asks the method for its statistics and to prune
a layer: neither branches on method names.
"""

from __future__ import annotations

import importlib
import pkgutil

from .base import CHANNEL, HESSIAN, STATISTICS, LayerPruned, Method, ScoreMethod, invalid

__all__ = [
    "CHANNEL",
    "FALLBACK_METHOD",
    "HESSIAN",
    "STATISTICS",
    "LayerPruned",
    "Method",
    "ScoreMethod",
    "UnknownMethodError",
    "all_methods",
    "get_method",
    "invalid",
    "method_names",
    "register",
    "unregister",
]

FALLBACK_METHOD = "magnitude"
"""What prunes a weight that no calibration token reached (e.g. an expert never routed to)."""

_BUILTIN = ("magnitude", "wanda", "ria", "cvr", "sparsegpt")
_REGISTRY: dict[str, Method] = {}


class UnknownMethodError(ValueError):
    """No method is registered under that name."""


def register(method: Method, replace: bool = False) -> Method:
    """Add ``method`` under ``method.name``; a second method of the same name is refused unless ``replace``."""
    if not isinstance(method, Method):
        raise TypeError(f"register() takes a Method instance, got {type(method).__name__}")
    name = method.name
    if not isinstance(name, str) or not name or name != name.strip() or name != name.lower():
        raise ValueError(f"a method name must be a non-empty lower-case string, got {name!r}")
    unknown = set(method.needs) - set(STATISTICS)
    if unknown:
        raise ValueError(f"method {name!r} needs unknown statistics {sorted(unknown)}; choose from {STATISTICS}")
    if name in _REGISTRY and not replace and _REGISTRY[name] is not method:
        raise ValueError(f"a method named {name!r} is already registered ({_REGISTRY[name]!r})")
    _REGISTRY[name] = method
    return method


def unregister(name: str) -> Method:
    """Remove and return the method registered as ``name`` (for tests and plugins that replace one)."""
    get_method(name)
    return _REGISTRY.pop(name)


def get_method(name: str) -> Method:
    """The method registered as ``name``."""
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        raise UnknownMethodError(
            f"unknown method {name!r}; choose one of {', '.join(_REGISTRY)}"
        ) from None


def method_names() -> tuple[str, ...]:
    """Registered method names, built-ins first in their fixed order."""
    return tuple(_REGISTRY)


def all_methods() -> tuple[Method, ...]:
    return tuple(_REGISTRY.values())


def _import_method_modules() -> None:
    others = sorted(
        m.name for m in pkgutil.iter_modules(__path__)
        if m.name not in _BUILTIN and m.name != "base" and not m.name.startswith("_")
    )
    for module in (*_BUILTIN, *others):
        importlib.import_module(f"{__name__}.{module}")


_import_method_modules()

"""``DataError``: the one exception of the data package, in its own module so that ``texts`` and
``corpora`` (which use each other) both import it from here and never from one another."""

from __future__ import annotations


class DataError(ValueError):
    """A text source or token budget that cannot give the requested windows (with what to do instead)."""

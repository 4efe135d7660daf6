"""The resume state of a streaming run: ``statprune_state.json`` in ``.<output>.partial/``.

It records what the run is (``identity``: settings, calibration digest, the source checkpoint's
``fingerprint``) and, per finished block, its shard, the sha256 of every tensor in it, the digest of the
source bytes the block was pruned from, and the seconds it took. A later run with the same identity reuses
the finished blocks; see docs/performance.md, "Resume: what is guaranteed".
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from pathlib import Path
from typing import Any

import torch

from .atomic import atomic_write_text
from .shards import sha256_in_place
from .writer import STATE_NAME

logger = logging.getLogger(__name__)


class ResumeMismatchError(ValueError):
    """An unfinished run with different settings (or a different source) occupies the output's partial
    directory."""


def tensor_digests(tensors: Mapping[str, torch.Tensor], pool: Executor | None = None) -> dict[str, str]:
    """sha256 of each tensor's stored bytes, hashed in parallel on ``pool`` (hashlib releases the GIL)."""
    if pool is None:
        return {k: sha256_in_place(v) for k, v in tensors.items()}
    futures = {k: pool.submit(sha256_in_place, v) for k, v in tensors.items()}
    return {k: f.result() for k, f in futures.items()}


def combined_digest(digests: Mapping[str, str]) -> str:
    """One digest for a block's tensors: sha256 over the sorted ``name=sha256`` lines."""
    return hashlib.sha256("".join(f"{k}={v}\n" for k, v in sorted(digests.items())).encode()).hexdigest()


def open_state(partial: Path, identity: dict[str, Any], overwrite: bool,
               source_check: Callable[[dict[str, Any]], str | None] | None = None) -> dict[str, Any]:
    """The state to resume from, or a fresh one in a fresh ``partial``.

    A partial left by a run with another identity, or whose ``source_check(state)`` names a difference, is
    discarded with ``overwrite`` (logged) and refused without it (``ResumeMismatchError`` saying how to
    discard it), unless it finished no block: then there is nothing to lose and it is discarded. A partial without a readable state (a crash before the first record, or the replaced model
    a killed swap left there) is discarded."""
    state_file = partial / STATE_NAME
    state = None
    if state_file.is_file():
        try:
            state = json.loads(state_file.read_text())
        except ValueError:
            logger.warning("%s is unreadable; starting over", state_file)
    if isinstance(state, dict) and isinstance(state.get("blocks"), dict):
        reason = None
        if state.get("identity") != identity:
            old = state.get("identity") or {}
            changed = sorted(k for k in identity if old.get(k) != identity[k])
            reason = f"a different {', '.join(changed) or 'version'}"
        elif source_check is not None and state["blocks"]:
            reason = source_check(state)
        if reason is None:
            return state
        if not state["blocks"]:  # nothing was finished: nothing to lose, and the corrected run just starts
            logger.info("discarding %s: an unfinished run with %s and no finished block", partial, reason)
        elif not overwrite:
            raise ResumeMismatchError(
                f"{partial} holds an unfinished run with {reason}; rerun with the same settings to resume, or pass "
                f"overwrite (--overwrite) to discard it and start over"
            )
        else:
            logger.warning("discarding %s: an unfinished run with %s (overwrite was given)", partial, reason)
    if partial.is_symlink() or partial.is_file():
        partial.unlink()
    elif partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    state = {"identity": identity, "blocks": {}}
    atomic_write_text(state_file, json.dumps(state, indent=1) + "\n")
    return state

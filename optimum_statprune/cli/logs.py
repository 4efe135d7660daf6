"""Logging and progress bars for the duration of one command, restored when it ends.

The package's own messages go to stderr as ``optimum-statprune: level: message``: warnings always,
``-v`` info, ``-vv`` debug. transformers, huggingface_hub and datasets are only tamed by
``quiet_libraries`` once a command is about to use them, so usage errors never import them.
"""

from __future__ import annotations

import contextlib
import logging
import sys
from collections.abc import Callable, Iterator

from .names import PROG

_SETTINGS: list[tuple[int, bool, list[Callable[[], None]]]] = []
"""Per running command: (verbose, quiet, undo callbacks) for ``quiet_libraries``."""


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return f"{PROG}: {record.levelname.lower()}: {record.getMessage()}"


@contextlib.contextmanager
def configure_logging(verbose: int, quiet: bool) -> Iterator[None]:
    """Log the package's messages to stderr while a command runs; afterwards everything it changed in
    logging (and, through ``quiet_libraries``, in the libraries) is put back."""
    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    package_logger = logging.getLogger("optimum_statprune")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter())
    old_level = package_logger.level
    package_logger.addHandler(handler)
    package_logger.setLevel(level)
    restore: list[Callable[[], None]] = []
    _SETTINGS.append((verbose, quiet, restore))
    try:
        yield
    finally:
        _SETTINGS.pop()
        for undo in reversed(restore):
            undo()
        package_logger.removeHandler(handler)
        package_logger.setLevel(old_level)


def quiet_libraries() -> None:
    """transformers' and huggingface_hub's messages at error level unless ``-vv`` (no "Retrying in 1s"
    lines); with ``--quiet`` their progress bars off too, datasets' and the GGUF reader's included.
    Done once per command, undone when it ends."""
    if not _SETTINGS:
        return
    verbose, quiet, restore = _SETTINGS[-1]
    if restore:
        return  # already done for this command
    from huggingface_hub import utils as hub_utils
    from transformers.utils import logging as tf_logging

    old_verbosity = tf_logging.get_verbosity()
    tf_logging.set_verbosity(logging.INFO if verbose >= 2 else logging.ERROR)
    restore.append(lambda: tf_logging.set_verbosity(old_verbosity))
    if verbose < 2:
        old_hub = hub_utils.logging.get_verbosity()
        hub_utils.logging.set_verbosity(logging.ERROR)
        restore.append(lambda: hub_utils.logging.set_verbosity(old_hub))
    if quiet:
        if tf_logging.is_progress_bar_enabled():
            tf_logging.disable_progress_bar()
            restore.append(tf_logging.enable_progress_bar)
        if not hub_utils.are_progress_bars_disabled():
            hub_utils.disable_progress_bars()
            restore.append(hub_utils.enable_progress_bars)
        from datasets import utils as ds_utils  # --calibration DIR and .jsonl files are read through datasets

        if not ds_utils.are_progress_bars_disabled():
            ds_utils.disable_progress_bars()
            restore.append(ds_utils.enable_progress_bars)
        from ..loading import silence_gguf_progress

        restore.append(silence_gguf_progress())
    restore.append(lambda: None)  # marks "done" even when nothing else was changed

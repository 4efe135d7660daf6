"""Atomic file writes: a temp file, fsync, chmod to what the umask allows, then rename over the target."""

from __future__ import annotations

import errno
import os
import tempfile
import threading
from pathlib import Path

_umask: int | None = None
_umask_lock = threading.Lock()


def umask() -> int:
    """The process umask, read once. From /proc where it can be (no change to the process state); else by
    setting and restoring it, which is done once, under a lock, before any writer thread of ours runs."""
    global _umask
    with _umask_lock:
        if _umask is None:
            try:
                with open("/proc/self/status") as f:
                    _umask = next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
            except (OSError, StopIteration, ValueError, IndexError):
                _umask = os.umask(0o022)
                os.umask(_umask)
        return _umask


def file_mode() -> int:
    """The mode ``open()`` would give a new file: 0o666 less the umask (mkstemp makes 0o600)."""
    return 0o666 & ~umask()


def dir_mode() -> int:
    """The mode ``mkdir`` would give a new directory (mkdtemp makes 0o700)."""
    return 0o777 & ~umask()


def atomic_write_text(path: str | os.PathLike, text: str, temp_beside: bool = False) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), temp_beside)


def atomic_write_bytes(path: str | os.PathLike, data: bytes, temp_beside: bool = False) -> None:
    """Write ``path`` whole or not at all, with the mode a plain ``open()`` would give it.

    ``temp_beside``: the temp file goes next to ``path``'s directory (``.<dir>.tmp-XXXX`` in its parent),
    not into it, for directories that are already published: a kill then leaves nothing inside the model
    directory, and the next run of that output removes the stray by its name. Falls back to a temp inside
    the directory when the parent is another filesystem (a mount point) or cannot be written."""
    path = os.path.abspath(path)
    directory = os.path.dirname(path)
    tmp = None
    if temp_beside:
        parent = os.path.dirname(directory)
        if parent != directory:
            try:
                tmp = _write_temp(parent, f".{os.path.basename(directory)}.tmp-", data)
                os.replace(tmp, path)
                return
            except OSError as e:
                if tmp is not None and os.path.exists(tmp):
                    os.unlink(tmp)
                if e.errno not in (errno.EXDEV, errno.EACCES, errno.EPERM, errno.EROFS):
                    raise
    tmp = _write_temp(directory, ".tmp-", data)
    try:
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _write_temp(directory: str, prefix: str, data: bytes) -> str:
    fd, tmp = tempfile.mkstemp(prefix=prefix, dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            if hasattr(os, "fchmod"):
                os.fchmod(f.fileno(), file_mode())
            os.fsync(f.fileno())
    except BaseException:
        os.unlink(tmp)
        raise
    return tmp


def fsync_path(path: Path, directory: bool = False) -> None:
    if directory and os.name == "nt":  # directories cannot be opened for fsync there
        return
    fd = os.open(path, (os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)) if directory else os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

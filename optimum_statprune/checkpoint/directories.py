"""Where a pruned model may be written, and how it is published there without ever losing a user's files.

Every writer (streaming, ``save_pretrained``, the CLI) checks its output with ``check_output`` before any
work, builds the model in a sibling directory (``.<name>.partial`` or ``.<name>.tmp-XXXX``), and publishes
it with ``publish``: the old output (if any) and the new one change places in one step, then the old one is
deleted. The output path therefore holds the complete old or the complete new model at every instant on
Linux (``renameat2(RENAME_EXCHANGE)``); where that call is missing, the old output is first renamed to
``.<name>.old``, which the next run of the same output renames back (``recover``) if it was killed between
the two renames.

Decisions, documented in docs/performance.md:
- a symlink to a directory as output: resolved; the model is published at the link's target, the link
  is left as it is (it then points at the new model);
- a mount point as output: refused (a mount point cannot be renamed away, and emptying it would empty
  a volume); give a directory inside it;
- the model directory itself, any directory above it, ``/``, the home directory and the current
  directory: refused, even empty and even with overwrite.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import shutil
from pathlib import Path

from .atomic import dir_mode, file_mode, fsync_path
from .writer import STATE_NAME

logger = logging.getLogger(__name__)


class OutputDirError(ValueError):
    """The output cannot be written safely; the message says why in one line."""


class OutputExistsError(OutputDirError, FileExistsError):
    """The output holds files and overwrite was not given."""


def partial_dir(output: Path) -> Path:
    return output.with_name(f".{output.name}.partial")


def aside_dir(output: Path) -> Path:
    return output.with_name(f".{output.name}.old")


def temp_prefix(output: Path) -> str:
    return f".{output.name}.tmp-"


def check_output(output: str | os.PathLike, overwrite: bool, model_path: str | os.PathLike | None = None) -> Path:
    """The directory to publish into (``output`` with symlinks resolved), or ``OutputDirError`` saying why
    not. Also recovers an output left aside by a killed swap and removes stale temporaries of this output
    (``.<name>.tmp-*``, ours by name), so that a run after a crash starts from what the user had."""
    given = Path(output).expanduser()
    if given.is_symlink() and not given.exists():
        raise OutputDirError(f"{output} is a symlink to {os.readlink(given)}, which does not exist; give a directory")
    path = given.resolve()
    if path.exists() and not path.is_dir():
        raise OutputDirError(f"{output} is a file; give a directory path")
    if path == Path(path.anchor) or path == Path.home().resolve() or path == Path.cwd().resolve():
        raise OutputDirError(f"{output} is the filesystem root, the home directory or the current directory; give a new directory for the pruned model")
    if model_path is not None and Path(model_path).expanduser().exists():
        model = Path(model_path).expanduser().resolve()
        if path == model or path in model.parents:
            what = "the model being pruned" if path == model else f"a directory holding the model {model_path}"
            raise OutputDirError(f"{output} is {what}; write the pruned model to another directory")
    if path.is_dir() and os.path.ismount(path):
        raise OutputDirError(f"{output} is a mount point, which cannot be replaced by a rename; give a directory inside it, e.g. {given / 'model'}")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputDirError(f"{output}: {parent} is not writable; the model is built beside the output and renamed into place, so its parent must be writable")
    recover(path)
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise OutputExistsError(f"{output} is not empty; choose another directory or pass overwrite (--overwrite) to replace it")
        if not os.access(path, os.W_OK | os.X_OK):
            raise OutputDirError(f"{output} is not writable, so its old contents could not be deleted after the replacement")
    return path


def recover(output: Path) -> None:
    """Undo what a killed ``publish`` left: an old output renamed aside comes back when nothing took its
    place; an aside copy whose output exists is deleted; temp directories/files of this output are removed."""
    aside = aside_dir(output)
    if aside.is_dir() and not aside.is_symlink():
        if not output.exists():
            logger.warning("restoring %s from %s (a previous run was killed while replacing it)", output, aside)
            os.replace(aside, output)
            fsync_path(output.parent, directory=True)
        else:
            logger.info("removing %s, left by a previous run that was killed after replacing %s", aside, output)
            shutil.rmtree(aside)
    partial = partial_dir(output)
    if partial.is_dir() and not partial.is_symlink() and not (partial / STATE_NAME).exists():
        # no resume state: a crash before the first record, or the replaced model a killed swap left there
        logger.info("removing %s, which holds no resumable run", partial)
        shutil.rmtree(partial, ignore_errors=True)
    if output.parent.is_dir():
        prefix = temp_prefix(output)
        for stray in output.parent.iterdir():
            if stray.name.startswith(prefix) and not stray.is_symlink():
                logger.info("removing %s, left by a previous run of %s that was killed", stray, output)
                if stray.is_dir():
                    shutil.rmtree(stray, ignore_errors=True)
                else:
                    stray.unlink(missing_ok=True)


def publish(new: Path, output: Path) -> None:
    """Move the finished directory ``new`` to ``output`` (a sibling), replacing what is there so that
    ``output`` holds the complete old or the complete new model after any failure or kill."""
    # every file in ``new`` is ours: give it the mode the umask gives a new file (mkstemp, mkdtemp and
    # safetensors' own temp files make 0o600 / 0o700)
    for f in new.rglob("*"):
        if not f.is_symlink():
            os.chmod(f, dir_mode() if f.is_dir() else file_mode())
    os.chmod(new, dir_mode())
    fsync_path(new, directory=True)
    if not output.exists():
        os.replace(new, output)
        fsync_path(output.parent, directory=True)
        return
    aside = aside_dir(output)
    if aside.exists():
        shutil.rmtree(aside)
    if _exchange(new, output):  # output is the new model now; ``new`` names the old one
        fsync_path(output.parent, directory=True)
        try:
            os.replace(new, aside)
        except OSError as e:  # the new model is in place; the old one, left in ``new``, is removed by the next run
            logger.warning("the pruned model is in %s, but moving the replaced one out of %s failed: %s", output, new, e)
            return
    else:
        os.replace(output, aside)
        try:
            os.replace(new, output)
        except BaseException:
            os.replace(aside, output)  # put the old one back
            raise
        fsync_path(output.parent, directory=True)
    try:
        shutil.rmtree(aside)
    except OSError as e:  # the new model is in place; the next run of this output retries
        logger.warning("the pruned model is in %s, but deleting the replaced one in %s failed: %s", output, aside, e)


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100
_renameat2 = None
if os.name == "posix":
    try:
        _renameat2 = getattr(ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True), "renameat2", None)
    except OSError:  # pragma: no cover - no C library to load
        _renameat2 = None


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux ``renameat2``); False where the system or filesystem cannot."""
    if _renameat2 is None:
        return False
    if _renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(b))

"""Checks that run before any model is loaded, so bad input costs seconds, not a model load."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import UsageError, one_line


def positive(value: int | None, flag: str) -> None:
    """``None`` (not given) or a positive integer."""
    if value is not None and value < 1:
        raise UsageError(f"{flag} {value}: use a positive integer")


def check_output_dir(output: str, overwrite: bool, model_path: str | None = None) -> Path:
    """Refuse, before any work, an output that is a file, a non-empty directory (without
    ``--overwrite``), or a directory whose replacement would be destructive."""
    path = Path(output).expanduser()
    if path.exists() and not path.is_dir():
        raise UsageError(f"--output {output} is a file; give a directory path")
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise UsageError(
                f"--output {output} already exists and is not empty; choose another directory or pass --overwrite to replace it"
            )
        resolved = path.resolve()
        cwd = Path.cwd().resolve()
        if resolved == cwd or resolved in cwd.parents or resolved == Path.home().resolve():
            raise UsageError(f"--output {output} is the current directory, one of its parents or the home directory; refusing to replace it even with --overwrite")
        if model_path is not None and Path(model_path).exists() and Path(model_path).resolve() == resolved:
            raise UsageError(f"--output {output} is the model being pruned; write the pruned model to another directory")
    parent = path.parent if not path.exists() else path
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not os.access(parent, os.W_OK):
        raise UsageError(f"--output {output}: {parent} is not writable; choose a directory you can write to")
    return path


def check_output_file(path: str | None, flag: str) -> None:
    """A file to write (``--json``, ``--png``) must not be a directory."""
    if path is None:
        return
    if Path(path).expanduser().is_dir():
        raise UsageError(f"{flag} {path} is a directory; give a file name")


def check_device(device: str | None) -> None:
    """A device that cannot work is a usage error now, not a runtime error after loading the model."""
    if device is None:
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError) as exc:
        raise UsageError(f"--device {device}: not a device name ({one_line(exc)}); use cpu, cuda or cuda:N") from exc
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: CUDA is not available here; leave out --device or use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UsageError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) here")

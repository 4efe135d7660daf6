"""Checks that run before any model is loaded, so bad input costs seconds, not a model load."""

from __future__ import annotations

from pathlib import Path

from .errors import UsageError, one_line


def positive(value: int | None, flag: str) -> None:
    """``None`` (not given) or a positive integer."""
    if value is not None and value < 1:
        raise UsageError(f"{flag} {value}: use a positive integer")


def check_output_dir(output: str, overwrite: bool, model_path: str | None = None) -> Path:
    """Refuse, before any work, an output that cannot be written safely (``checkpoint.directories``)."""
    from ..checkpoint.directories import OutputDirError, check_output

    try:
        return check_output(output, overwrite, model_path)
    except OutputDirError as exc:
        raise UsageError(f"--output {exc}".replace("pass overwrite (--overwrite)", "pass --overwrite")) from None


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

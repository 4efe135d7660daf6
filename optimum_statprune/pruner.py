"""`StatPruner`: load a causal LM, prune it with a `StatPruneConfig`, save it with its manifest."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from optimum.quantization_base import OptimumQuantizer
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from .config import StatPruneConfig
from .engine import CalibrationBatch, PruneReport, iter_batches, prune_model
from .manifest import build_manifest, calibration_fingerprint, tensor_sha256, write_manifest
from .models import find_blocks, find_targets

logger = logging.getLogger(__name__)

Calibration = Any  # list[str] | torch.Tensor | str (file, dataset or preset name)


class StatPruner(OptimumQuantizer):
    """Prunes a causal LM's decoder blocks one at a time.

    >>> pruner = StatPruner.from_pretrained("path/or/hub-id", config=StatPruneConfig(sparsity=0.5))
    >>> model = pruner.prune(["some calibration text", ...])
    >>> pruner.save_pretrained("pruned-model")
    """

    def __init__(
        self,
        model: PreTrainedModel,
        config: StatPruneConfig | None = None,
        tokenizer: Any = None,
        device: str | torch.device | None = None,
        blocks: str | None = None,
    ):
        self.model = model
        self.config = config if config is not None else StatPruneConfig()
        self.tokenizer = tokenizer
        self.device = device
        self.blocks = blocks
        self.report: PruneReport | None = None
        self.calibration_info: dict[str, Any] | None = None
        find_blocks(model, blocks)  # fail now, not after loading calibration data

    @classmethod
    def from_pretrained(
        cls,
        model_or_path: str | os.PathLike | PreTrainedModel,
        config: StatPruneConfig | None = None,
        tokenizer: Any = None,
        device: str | torch.device | None = None,
        blocks: str | None = None,
        **loading_kwargs: Any,
    ) -> StatPruner:
        """From a local directory, a Hub id, or an already loaded model (pass ``tokenizer=`` then).

        ``loading_kwargs`` go to ``AutoModelForCausalLM.from_pretrained`` (``torch_dtype``,
        ``gguf_file``, ``revision``...). ``trust_remote_code`` stays off unless given.
        """
        if isinstance(model_or_path, PreTrainedModel):
            return cls(model_or_path, config, tokenizer, device, blocks)
        loading_kwargs.setdefault("trust_remote_code", False)
        model = AutoModelForCausalLM.from_pretrained(model_or_path, **loading_kwargs)
        if tokenizer is None:
            tok_kwargs = {k: loading_kwargs[k] for k in ("gguf_file", "revision", "trust_remote_code") if k in loading_kwargs}
            tokenizer = AutoTokenizer.from_pretrained(model_or_path, **tok_kwargs)
        return cls(model, config, tokenizer, device, blocks)

    # ------------------------------------------------------------------------------------ calibration
    def calibration_batches(self, calibration: Calibration) -> list[CalibrationBatch]:
        """Turn the user's calibration into micro-batches of token ids (and padding masks)."""
        cfg = self.config
        mask = None
        if isinstance(calibration, torch.Tensor):
            ids = calibration
            if ids.dim() == 1:
                from .data import calibration_windows

                ids = calibration_windows(ids, self.tokenizer, cfg.nsamples, cfg.seqlen, cfg.seed)
            if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
                raise ValueError("calibration token ids must be an integer tensor of shape [samples, tokens]")
            ids = ids.long()
        elif isinstance(calibration, (list, tuple)) and calibration and all(isinstance(s, str) for s in calibration):
            ids, mask = self._tokenize_samples(list(calibration)[: cfg.nsamples])
        elif isinstance(calibration, (str, os.PathLike)):
            from .data import calibration_windows, load_texts

            ids = calibration_windows(load_texts(str(calibration)), self._require_tokenizer(), cfg.nsamples, cfg.seqlen, cfg.seed)
        else:
            raise ValueError(
                "calibration must be a list of strings, a tensor of token ids, or a file / dataset name; "
                f"got {type(calibration).__name__}"
            )
        self.calibration_info = calibration_fingerprint(ids, mask, ids.shape[1], cfg.seed)
        return list(iter_batches(ids, mask, cfg.batch_size))

    def _require_tokenizer(self):
        if self.tokenizer is None:
            raise ValueError("text calibration needs a tokenizer: pass tokenizer= to StatPruner.from_pretrained")
        return self.tokenizer

    def _tokenize_samples(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Each string is one sample, truncated to ``seqlen``; padding is masked out of the statistics."""
        tok = self._require_tokenizer()
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        enc = tok(texts, return_tensors="pt", padding=True, truncation=True, max_length=self.config.seqlen)
        return enc["input_ids"], enc["attention_mask"]

    # ------------------------------------------------------------------------------------ pruning
    def prune(self, calibration: Calibration = None, progress: bool = True) -> PreTrainedModel:
        """Prune the model in place and return it. Magnitude pruning needs no ``calibration``."""
        if self.config.needs_activations:
            if calibration is None:
                raise ValueError(f"method {self.config.method!r} needs calibration data (texts or token ids)")
            batches = self.calibration_batches(calibration)
        else:
            batches = []
        self.report = prune_model(self.model, batches, self.config, self.device, self.blocks, progress)
        return self.model

    def quantize(self, save_dir: str | Path, file_prefix: str | None = None, calibration: Calibration = None, **kwargs):
        """Optimum's entry point: prune, then save to ``save_dir``."""
        self.prune(calibration)
        return self.save_pretrained(save_dir, **kwargs)

    # ------------------------------------------------------------------------------------ saving
    def manifest(self) -> dict[str, Any]:
        if self.report is None:
            raise RuntimeError("call prune() before saving: there is nothing to describe yet")
        params = dict(self.model.named_parameters())
        layers = []
        blocks_path, block_list = find_blocks(self.model, self.blocks)
        targets = {
            t.name: t
            for i, block in enumerate(block_list)
            for t in find_targets(block, f"{blocks_path}.{i}", self.config.targets, self.config.ignore)
        }
        for rec in self.report.layers:
            rec = dict(rec)
            t = targets[rec["name"]]
            key = f"{t.name}.weight" if t.kind != "expert" else t.name.rsplit(".", 2)[0] + f".{t.param}"
            rec["tensor"] = key if key in params else None
            rec["sha256"] = tensor_sha256(t.weight())
            layers.append(rec)
        info = {
            "name_or_path": getattr(self.model.config, "_name_or_path", None),
            "architecture": type(self.model).__name__,
            "dtype": str(self.model.dtype).replace("torch.", ""),
        }
        return build_manifest(self.config.resolved(), layers, self.calibration_info, info, self.report.seconds)

    def save_pretrained(self, save_dir: str | Path, overwrite: bool = False, max_shard_size: str = "5GB") -> str:
        """Write safetensors shards, ``config.json``, tokenizer, ``statprune_config.json`` and
        ``pruning_manifest.json``. Everything lands in a temporary sibling directory that is renamed into
        place only when complete, so an interrupted save never leaves a directory that looks whole."""
        save_dir = Path(save_dir)
        if save_dir.exists() and any(save_dir.iterdir()) and not overwrite:
            raise FileExistsError(f"{save_dir} is not empty; choose another directory or pass overwrite=True")
        manifest = self.manifest()
        save_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{save_dir.name}.tmp-", dir=save_dir.parent))
        try:
            self.model.save_pretrained(tmp, max_shard_size=max_shard_size)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(tmp)
            self.config.save_pretrained(tmp)
            write_manifest(tmp, manifest)
            _replace_dir(tmp, save_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        logger.info("saved pruned model to %s", save_dir)
        return str(save_dir)


def _replace_dir(src: Path, dst: Path) -> None:
    """Move the finished ``src`` to ``dst``; an existing ``dst`` is swapped out first, then deleted."""
    if not dst.exists():
        os.replace(src, dst)
        return
    old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
    os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)

"""`StatPruner`: load a causal LM, prune it with a `StatPruneConfig`, save it with its manifest."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from optimum.quantization_base import OptimumQuantizer
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from .checkpoint.directories import check_output, publish, temp_prefix
from .checkpoint.shards import tensor_sha256
from .config import StatPruneConfig
from .engine.biases import declare_added_biases
from .engine.distributed import DistContext, context, rank_device
from .engine.loop import CalibrationBatch, PruneReport, default_device, iter_batches, prune_model
from .engine.offload import stored_weight
from .engine.prune_step import check_model_finite
from .engine.targets import check_targets_found, find_blocks, find_targets
from .loading import gguf_dequantize_config
from .sharing.manifest import (
    MANIFEST_NAME,
    build_manifest,
    calibration_fingerprint,
    pruning_config_block,
    saved_shards,
    write_manifest,
)

if TYPE_CHECKING:
    from .engine.streaming import StreamingOptions

logger = logging.getLogger(__name__)

Calibration = Any  # list[str] | torch.Tensor | str (file, dataset or preset name)


class StatPruner(OptimumQuantizer):
    """Prunes a causal LM's decoder blocks one at a time.

    >>> pruner = StatPruner.from_pretrained("path/or/hub-id", config=StatPruneConfig(sparsity=0.5))
    >>> model = pruner.prune(["some calibration text", ...])      # in memory, or
    >>> pruner.prune(texts, output_dir="pruned-model")              # shard to shard, never all in RAM
    """

    def __init__(
        self,
        model: PreTrainedModel | None = None,
        config: StatPruneConfig | None = None,
        tokenizer: Any = None,
        device: str | torch.device | None = None,
        blocks: str | None = None,
        source: str | os.PathLike | None = None,
        loading_kwargs: dict[str, Any] | None = None,
    ):
        if model is None and source is None:
            raise ValueError("StatPruner needs a model or a source path / Hub id")
        self._model = model
        self.source = source
        self.loading_kwargs = dict(loading_kwargs or {})
        self.loading_kwargs.setdefault("trust_remote_code", False)
        if self.loading_kwargs.get("gguf_file") and "quantization_config" not in self.loading_kwargs:
            dequantize = gguf_dequantize_config()
            if dequantize is not None:
                self.loading_kwargs["quantization_config"] = dequantize
        self.config = config if config is not None else StatPruneConfig()
        self.tokenizer = tokenizer
        self.device = device
        self.blocks = blocks
        self.report: PruneReport | None = None
        self.calibration_info: dict[str, Any] | None = None
        if model is not None:
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

        ``loading_kwargs`` go to ``AutoModelForCausalLM.from_pretrained`` (``dtype``, ``gguf_file``,
        ``revision``, ``device_map``...). ``trust_remote_code`` stays off unless given. The weights are
        not loaded here: ``prune(..., output_dir=...)`` streams them from the checkpoint's shards, and
        ``pruner.model`` loads them in memory on first use.
        """
        if isinstance(model_or_path, PreTrainedModel):
            return cls(model_or_path, config, tokenizer, device, blocks)
        if tokenizer is None:
            keys = ("gguf_file", "revision", "trust_remote_code", "token", "cache_dir")
            try:
                tokenizer = AutoTokenizer.from_pretrained(model_or_path, **{k: loading_kwargs[k] for k in keys if k in loading_kwargs})
            except (OSError, ValueError) as e:  # token-id calibration needs none; text calibration will say so
                logger.warning("no tokenizer loaded from %s (%s)", model_or_path, str(e).splitlines()[0])
        return cls(None, config, tokenizer, device, blocks, source=model_or_path, loading_kwargs=loading_kwargs)

    @property
    def model(self) -> PreTrainedModel:
        """The model in memory (loaded from ``source`` on first use)."""
        if self._model is None:
            self._model = AutoModelForCausalLM.from_pretrained(self.source, **self.loading_kwargs)
            find_blocks(self._model, self.blocks)
            if _dtype(self.loading_kwargs.get("dtype", self.loading_kwargs.get("torch_dtype"))) is not None:
                # a requested dtype can overflow (float16 above 65504): refuse before anything is pruned or saved
                check_model_finite(self._model, f"{self.source} loaded as {self.loading_kwargs.get('dtype')}")
        return self._model

    @property
    def model_config(self):
        if self._model is not None:
            return self._model.config
        keys = ("gguf_file", "revision", "trust_remote_code", "token", "cache_dir")
        return AutoConfig.from_pretrained(self.source, **{k: self.loading_kwargs[k] for k in keys if k in self.loading_kwargs})

    def _checkpoint_dir(self) -> Path | None:
        """The local safetensors checkpoint to stream from, or None when the weights must be loaded."""
        if self._model is not None or self.loading_kwargs.get("gguf_file") or self.loading_kwargs.get("device_map"):
            return None
        path = Path(self.source)
        if not path.is_dir():
            from huggingface_hub import snapshot_download

            patterns = ["*.safetensors", "*.json"]
            kwargs = {k: self.loading_kwargs[k] for k in ("revision", "token", "cache_dir") if k in self.loading_kwargs}
            path = Path(snapshot_download(str(self.source), allow_patterns=patterns, **kwargs))
        if (path / "model.safetensors.index.json").is_file() or (path / "model.safetensors").is_file():
            return path
        return None

    # ------------------------------------------------------------------------------------ calibration
    def calibration_batches(self, calibration: Calibration, allow_short: bool = False) -> list[CalibrationBatch]:
        """Turn the user's calibration into micro-batches of token ids (and padding masks).

        A list of strings is one sample per string, truncated to ``seqlen``; together they must hold
        ``nsamples × seqlen`` tokens, as the CLI's windows do, unless ``allow_short`` (recorded in the
        manifest's calibration block). No tokens at all is always an error."""
        from .data.texts import DataError

        cfg = self.config
        mask = None
        short = None
        if isinstance(calibration, torch.Tensor):
            ids = calibration
            if ids.dim() == 1:
                from .data.texts import calibration_windows, resolve_seqlen

                ids = calibration_windows(ids, self.tokenizer, cfg.nsamples, resolve_seqlen(cfg.seqlen, self.model_config), cfg.seed)
            if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
                raise ValueError("calibration token ids must be an integer tensor of shape [samples, tokens]")
            ids = ids.long()
        elif isinstance(calibration, (list, tuple)) and calibration and all(isinstance(s, str) for s in calibration):
            ids, mask = self._tokenize_samples(list(calibration)[: cfg.nsamples])
            found, needed = int(mask.sum()), cfg.nsamples * cfg.seqlen
            if found == 0 or (found < needed and not allow_short):
                raise DataError(
                    f"the calibration texts hold {found} tokens in {len(calibration)} sample(s); nsamples × seqlen = "
                    f"{cfg.nsamples} × {cfg.seqlen} = {needed} are needed. Give more text, lower nsamples or seqlen"
                    + (", or pass allow_short_calibration=True to prune on fewer" if found else "")
                )
            if found < needed:
                short = {"tokens": found, "needed": needed}
        elif isinstance(calibration, (str, os.PathLike)):
            from .data.texts import calibration_windows, load_texts, resolve_seqlen

            seqlen = resolve_seqlen(cfg.seqlen, self.model_config)  # capped to the context, with a warning
            ids = calibration_windows(load_texts(str(calibration)), self._require_tokenizer(), cfg.nsamples, seqlen, cfg.seed)
        else:
            raise ValueError(
                "calibration must be a list of strings, a tensor of token ids, or a file / dataset name; "
                f"got {type(calibration).__name__}"
            )
        if ids.numel() == 0:
            raise DataError(f"the calibration holds no tokens (token ids of shape {list(ids.shape)})")
        self.calibration_info = calibration_fingerprint(ids, mask, ids.shape[1], cfg.seed)
        if short is not None:
            self.calibration_info["allow_short_calibration"] = short
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
    def prune(
        self,
        calibration: Calibration = None,
        output_dir: str | os.PathLike | None = None,
        overwrite: bool = False,
        progress: bool = True,
        activations: str = "auto",
        streaming: StreamingOptions | None = None,
        allow_short_calibration: bool = False,
    ) -> PreTrainedModel | str:
        """Prune and return the model, or with ``output_dir`` write the pruned model there and return its
        path. Magnitude pruning needs no ``calibration``.

        With ``output_dir`` and a safetensors checkpoint as source, blocks are streamed from the input
        shards to the output shards and the whole model is never in host memory; an interrupted run
        resumes when called again with the same arguments. ``activations`` places the calibration hidden
        states between blocks: "device", "host" (pinned memory), or "auto" by free GPU memory.
        ``streaming`` sets the streaming I/O knobs (``StreamingOptions``). Text calibration with fewer
        than ``nsamples × seqlen`` tokens is refused unless ``allow_short_calibration``."""
        dist = self.dist
        if output_dir is not None:
            dist.on_main(lambda: check_output(output_dir, overwrite, self._local_source()))
        self._check_shapes()
        checkpoint = self._checkpoint_dir() if output_dir is not None else None
        if checkpoint is not None and self.config.add_bias and self.config.resolved_compensation() == "bias":
            raise ValueError(
                "bias compensation with add_bias=True is not available when streaming to output_dir (shards "
                "are written before every block's biases are known); prune in memory, then save_pretrained"
            )
        batches = self._batches(calibration, allow_short_calibration)
        if checkpoint is not None:
            from .engine.streaming import prune_checkpoint

            self.report = prune_checkpoint(
                checkpoint, output_dir, batches, self.config, self.calibration_info, self._device(),
                dtype=_dtype(self.loading_kwargs.get("dtype", self.loading_kwargs.get("torch_dtype"))),
                tokenizer=self.tokenizer, blocks=self.blocks, overwrite=overwrite, progress=progress,
                trust_remote_code=self.loading_kwargs["trust_remote_code"], activations=activations,
                base_model=self._base_model(), options=streaming, dist=dist,
            )
            return str(output_dir)
        self.report = prune_model(self.model, batches, self.config, self._device(), self.blocks, progress, activations,
                                  dist=dist)
        if output_dir is not None:
            return self.save_pretrained(output_dir, overwrite=overwrite)
        return self.model

    def _batches(self, calibration: Calibration, allow_short: bool = False) -> list[CalibrationBatch]:
        if not self.config.needs_activations:
            return []
        if calibration is None:
            raise ValueError(f"method {self.config.method!r} needs calibration data (texts or token ids)")
        return self.calibration_batches(calibration, allow_short)

    def _local_source(self) -> str | None:
        source = self.source if self.source is not None else getattr(self._model.config, "_name_or_path", None)
        return str(source) if source and Path(str(source)).exists() else None

    def _check_shapes(self) -> None:
        """What the layers' shapes and names alone can refuse, before any weight is read or a partial output
        is started: targets that select nothing, and N:M widths. From the meta-device skeleton when the
        weights are not loaded."""
        from .engine.streaming import check_pattern_widths

        if not self.config.targets and not self.config.ignore and self.config.nm is None:
            return
        model = self._model
        if model is None:
            from accelerate import init_empty_weights

            trust = self.loading_kwargs.get("trust_remote_code", False)
            try:
                with init_empty_weights(include_buffers=False):
                    model = AutoModelForCausalLM.from_config(self.model_config, trust_remote_code=trust)
            except Exception as e:  # noqa: BLE001 - an early check only: the loop checks again
                logger.debug("no meta skeleton for the early shape checks (%s); layers are checked when pruned", e)
                return
        blocks_path, block_list = find_blocks(model, self.blocks)
        check_targets_found(block_list, len(block_list), blocks_path, self.config.targets, self.config.ignore)
        if self.config.nm is not None:
            check_pattern_widths(model, self.config, self.blocks)

    def _device(self) -> torch.device:
        return rank_device(self.dist, torch.device(self.device) if self.device is not None else default_device())

    @property
    def dist(self) -> DistContext:
        """The processes pruning together (``torchrun`` / ``accelerate launch``); one when not launched so."""
        return context()

    def quantize(self, save_dir: str | Path, file_prefix: str | None = None, calibration: Calibration = None, **kwargs):
        """Optimum's entry point: prune into ``save_dir`` (streaming when the source allows it)."""
        return self.prune(calibration, output_dir=save_dir, **kwargs)

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
            rec["tensor"] = t.state_key if t.state_key in params else None
            rec["sha256"] = tensor_sha256(stored_weight(self.model, t))  # offloaded: from the weights map
            layers.append(rec)
        info = {
            "name_or_path": getattr(self.model.config, "_name_or_path", None),
            "architecture": type(self.model).__name__,
            "dtype": str(self.model.dtype).replace("torch.", ""),
        }
        return build_manifest(self.config.resolved(), layers, self.calibration_info, info, self.report.seconds, self.report.owl,
                              world_size=self.dist.world_size)

    def _base_model(self) -> str | None:
        """The Hub id the model came from, when it came from the Hub."""
        source = self.source if self.source is not None else getattr(self._model.config, "_name_or_path", None)
        return _hub_id(source)

    def push_to_hub(
        self,
        repo_id: str,
        save_dir: str | Path | None = None,
        private: bool = False,
        token: str | None = None,
        commit_message: str | None = None,
        **kwargs: Any,
    ) -> str:
        """Upload the pruned model (saved to ``save_dir``, or a temporary directory when the model is only
        in memory) with its manifest and a model card; creates the repo if needed. With several processes
        only rank 0 uploads; every rank returns its result."""
        dist = self.dist
        if dist.active:
            return dist.on_main(lambda: self._push(repo_id, save_dir, private, token, commit_message, **kwargs))
        return self._push(repo_id, save_dir, private, token, commit_message, **kwargs)

    def _push(self, repo_id: str, save_dir: str | Path | None, private: bool, token: str | None,
              commit_message: str | None, **kwargs: Any) -> str:
        from .sharing.hub import push_to_hub

        if save_dir is None or not Path(save_dir, MANIFEST_NAME).exists():
            if save_dir is None:
                with tempfile.TemporaryDirectory() as tmp:
                    saved = self._save(Path(tmp) / "model", False, "5GB")  # on this rank only
                    return push_to_hub(saved, repo_id, private=private, token=token, commit_message=commit_message,
                                       base_model=self._base_model(), **kwargs)
            self._save(save_dir, False, "5GB")
        return push_to_hub(save_dir, repo_id, private=private, token=token, commit_message=commit_message,
                           base_model=self._base_model(), **kwargs)

    @staticmethod
    def load_manifest(dir_or_repo_id: str | os.PathLike, revision: str | None = None, token: str | None = None) -> dict[str, Any]:
        """The ``pruning_manifest.json`` of a local directory or a Hub repo."""
        from .sharing.verify import load_manifest

        return load_manifest(dir_or_repo_id, revision=revision, token=token)

    def save_pretrained(self, save_dir: str | Path, overwrite: bool = False, max_shard_size: str = "5GB") -> str:
        """Write safetensors shards, ``config.json``, tokenizer, ``statprune_config.json`` and
        ``pruning_manifest.json``. Everything lands in a temporary sibling directory that is renamed into
        place only when complete, so an interrupted save never leaves a directory that looks whole; the
        manifest hashes every tensor as read back from the written shards. With several processes only rank 0
        writes (every rank holds the same pruned model); the others wait for it and return the same path."""
        dist = self.dist
        if dist.active:
            dist.on_main(lambda: self._save(save_dir, overwrite, max_shard_size))
            return str(save_dir)
        return self._save(save_dir, overwrite, max_shard_size)

    def _save(self, save_dir: str | Path, overwrite: bool, max_shard_size: str) -> str:
        given = save_dir
        save_dir = check_output(save_dir, overwrite, self._local_source())
        declare_added_biases(self.model)
        manifest = self.manifest()
        save_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=temp_prefix(save_dir), dir=save_dir.parent))
        try:
            self.model.config.pruning_config = pruning_config_block(manifest["config"], self._base_model())
            self.model.save_pretrained(tmp, max_shard_size=max_shard_size)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(tmp)
            self.config.save_pretrained(tmp)
            manifest["tensors"], manifest["files"] = saved_shards(tmp)
            write_manifest(tmp, manifest, published=False)
            publish(tmp, save_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        logger.info("saved pruned model to %s", save_dir)
        return str(given)


def _hub_id(name: Any) -> str | None:
    from .sharing.hub import looks_like_hub_id

    return str(name) if name and not Path(str(name)).exists() and looks_like_hub_id(str(name)) else None


def _dtype(value: Any) -> torch.dtype | None:
    """``torch.float16`` / ``"float16"`` -> dtype; ``None`` / ``"auto"`` -> keep the checkpoint's."""
    if value is None or value == "auto":
        return None
    if isinstance(value, torch.dtype):
        return value
    dtype = getattr(torch, str(value).replace("torch.", ""), None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {value!r}; use e.g. float16, bfloat16 or float32")
    return dtype

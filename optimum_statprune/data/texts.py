"""Calibration and evaluation tokens: text sources, random calibration windows, evaluation windows.

Every source ends up as a list of strings (``load_texts``). The strings are joined with
``JOIN_SEPARATOR`` ("\\n\\n", as the standard WikiText-2 loader joins its rows) and tokenized ONCE, so
a window may span two documents; that is what the standard protocols do and what keeps the token
stream independent of how the text was split into rows. Windows are then cut from that stream:

- ``calibration_windows``: ``nsamples`` windows of ``seqlen`` tokens at random offsets drawn from a
  private ``random.Random(seed)`` (never the global RNG), so the same seed gives the same tokens.
- ``evaluation_windows``: the non-overlapping windows ``ids[i*seqlen:(i+1)*seqlen]`` (the
  SparseGPT/Wanda WikiText-2 protocol); the tail shorter than ``seqlen`` is dropped.

``seqlen`` is always explicit; ``resolve_seqlen`` only ever lowers it to the model's context length.
Hub presets ("c4", "wikitext2") need internet and fail at once, with a ``DataError``, in offline mode
(``is_offline``: the Hugging Face libraries' own setting); when the Hub cannot be reached the
``datasets`` error is reported the same way. The offline corpora ("enwiki-excerpt",
"lee-background") come from ``corpora.py``.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from .corpora import CORPORA, corpus_text
from .errors import DataError

logger = logging.getLogger(__name__)

JOIN_SEPARATOR = "\n\n"
"""How texts are joined before tokenization (as the standard WikiText-2 loader does)."""

LOCAL_FORMATS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}

# name -> (hub dataset, config, data_files per split or None, default number of rows kept per split)
HUB_PRESETS: dict[str, dict[str, Any]] = {
    "c4": {
        "path": "allenai/c4",
        "config": None,
        # The shards the SparseGPT/Wanda C4 loader uses (one train shard, one validation shard).
        "data_files": {
            "train": "en/c4-train.00000-of-01024.json.gz",
            "validation": "en/c4-validation.00000-of-00008.json.gz",
        },
        # The train shard holds ~356k documents (~170M tokens); tokenizing all of it once would take
        # minutes and gigabytes for 262k calibration tokens. Validation: the standard 1100 documents.
        "max_texts": {"train": 20_000, "validation": 1100},
    },
    "wikitext2": {
        "path": "Salesforce/wikitext",
        "config": "wikitext-2-raw-v1",
        "data_files": None,
        "max_texts": {},
    },
}
PRESET_ALIASES = {
    "c4": "c4",
    "allenai/c4": "c4",
    "wikitext2": "wikitext2",
    "wikitext-2": "wikitext2",
    "wikitext2-raw": "wikitext2",
}
CONTEXT_ATTRIBUTES = (
    "max_position_embeddings",
    "n_positions",
    "max_sequence_length",
    "seq_length",
    "n_ctx",
    "max_seq_len",
)


# --------------------------------------------------------------------------------------------------
# Text sources
# --------------------------------------------------------------------------------------------------


def load_texts(
    source: str | os.PathLike | Sequence[str],
    *,
    split: str | None = None,
    text_field: str = "text",
    config_name: str | None = None,
    lines: bool = False,
    max_texts: int | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> list[str]:
    """Turn any supported text source into a list of strings.

    ``source`` may be:

    - a list/tuple of strings (returned as a list);
    - a local ``.txt`` file: its whole text as one string (so windows see the file's exact token
      stream), or one string per non-empty line with ``lines=True``;
    - a local ``.json``/``.jsonl``/``.parquet``/``.csv`` file or a local dataset directory (written by
      ``Dataset.save_to_disk`` or holding data files), read through ``datasets``;
    - an offline corpus preset: ``"enwiki-excerpt"`` or ``"lee-background"`` (see ``corpora.py``);
    - a hub preset needing internet: ``"c4"`` (allenai/c4, the standard SparseGPT/Wanda shards;
      ``split="train"`` for calibration, ``"validation"`` for evaluation) or ``"wikitext2"``
      (wikitext-2-raw-v1; ``"train"`` for calibration, ``"test"`` for evaluation);
    - any other Hugging Face dataset name (with ``config_name``, ``split``, ``text_field``).

    ``split`` defaults to ``"train"`` (the calibration split). ``max_texts`` keeps the first rows only;
    for "c4" it defaults to 20,000 train / 1,100 validation documents. Remote code is never run.
    """
    if isinstance(source, (list, tuple)):
        bad = [type(t).__name__ for t in source if not isinstance(t, str)]
        if bad:
            raise DataError(f"load_texts: a list source must hold only strings, found {sorted(set(bad))}.")
        return _head(list(source), max_texts)
    if not isinstance(source, (str, os.PathLike)):
        raise DataError(
            f"load_texts: unsupported source type {type(source).__name__}; pass a list of strings, a file "
            "path, a dataset directory or a dataset name."
        )

    path = Path(source).expanduser()
    if path.is_file():
        return _head(_load_local_file(path, split, text_field, lines, cache_dir), max_texts)
    if path.is_dir():
        return _head(_load_local_dir(path, split, text_field, cache_dir), max_texts)

    name = os.fspath(source)
    if name in CORPORA:
        text = corpus_text(name)
        return _head(_split_lines(text) if lines else [text], max_texts)
    if Path(name).suffix.lower() in {".txt", *LOCAL_FORMATS} or name.startswith((".", "/", "~")):
        raise DataError(f"load_texts: local file {name!r} does not exist.")
    preset = PRESET_ALIASES.get(name.lower())
    if preset is not None:
        return _load_hub_preset(preset, split, max_texts, cache_dir)
    return _head(_load_hub_dataset(name, config_name, split, text_field, cache_dir), max_texts)


def _head(texts: list[str], max_texts: int | None) -> list[str]:
    if max_texts is not None:
        if max_texts < 1:
            raise DataError(f"load_texts: max_texts must be >= 1, got {max_texts}.")
        return texts[:max_texts]
    return texts


def _split_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


def _load_local_file(
    path: Path, split: str | None, text_field: str, lines: bool, cache_dir: str | os.PathLike | None
) -> list[str]:
    suffix = path.suffix.lower()
    if suffix == ".txt":
        text = path.read_text(encoding="utf-8")
        return _split_lines(text) if lines else [text]
    builder = LOCAL_FORMATS.get(suffix)
    if builder is None:
        raise DataError(
            f"load_texts: cannot read {path.name!r}; supported files are .txt, "
            f"{', '.join(sorted(LOCAL_FORMATS))}."
        )
    import datasets

    split = split or "train"
    ds = datasets.load_dataset(
        builder, data_files={split: str(path)}, split=split, cache_dir=_opt_str(cache_dir)
    )
    return _column(ds, text_field, str(path))


def _load_local_dir(
    path: Path, split: str | None, text_field: str, cache_dir: str | os.PathLike | None
) -> list[str]:
    import datasets

    if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
        # Written by save_to_disk: Arrow files plus JSON metadata (no pickles).
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            ds = _pick_split(ds, split, str(path))
        return _column(ds, text_field, str(path))
    try:
        ds = datasets.load_dataset(str(path), split=split or "train", cache_dir=_opt_str(cache_dir))
    except Exception as exc:
        raise DataError(f"load_texts: could not read the dataset directory {str(path)!r}: {exc}") from exc
    return _column(ds, text_field, str(path))


def _pick_split(ds: Any, split: str | None, where: str) -> Any:
    if split is None:
        split = "train" if "train" in ds else next(iter(ds))
    if split not in ds:
        raise DataError(f"load_texts: {where} has no split {split!r}; it has {sorted(ds)}.")
    return ds[split]


def _column(ds: Any, text_field: str, where: str) -> list[str]:
    if text_field not in ds.column_names:
        raise DataError(
            f"load_texts: {where} has no column {text_field!r}; its columns are {ds.column_names}. "
            "Pass text_field=..."
        )
    return [t if isinstance(t, str) else "" for t in ds[text_field]]


def _opt_str(value: str | os.PathLike | None) -> str | None:
    return None if value is None else os.fspath(value)


def is_offline() -> bool:
    """Whether the Hugging Face libraries were told to stay offline, as they themselves read it:
    ``huggingface_hub``'s ``HF_HUB_OFFLINE`` (which also honours ``TRANSFORMERS_OFFLINE``) and
    ``datasets``' ``HF_DATASETS_OFFLINE``. Both are read from the environment when the library is
    imported, so this agrees with what ``load_dataset`` will do."""
    from huggingface_hub import constants

    if constants.is_offline_mode():
        return True
    import datasets.config

    return bool(datasets.config.HF_DATASETS_OFFLINE)


def needs_internet(what: str, reason: str) -> DataError:
    """The error for a Hub source that cannot be had here, with the local alternatives."""
    return DataError(
        f"{what} is downloaded from the Hugging Face Hub and needs internet ({reason}). Use a local "
        "source instead: a .txt/.json/.jsonl/.parquet file or dataset directory, or an offline corpus "
        "('enwiki-excerpt', 'lee-background')."
    )


def _load_hub_preset(
    preset: str, split: str | None, max_texts: int | None, cache_dir: str | os.PathLike | None
) -> list[str]:
    spec = HUB_PRESETS[preset]
    split = split or "train"
    what = f"The {preset!r} preset ({spec['path']})"
    if spec["data_files"] is not None and split not in spec["data_files"]:
        raise DataError(f"{what} has splits {sorted(spec['data_files'])}, not {split!r}.")
    if is_offline():
        raise needs_internet(what, "offline mode is set: HF_HUB_OFFLINE / HF_DATASETS_OFFLINE")
    import datasets

    kwargs: dict[str, Any] = {"split": split, "cache_dir": _opt_str(cache_dir)}
    if spec["data_files"] is not None:
        kwargs["data_files"] = {split: spec["data_files"][split]}
    try:
        ds = datasets.load_dataset(spec["path"], spec["config"], **kwargs)
    except Exception as exc:
        raise needs_internet(what, f"loading failed: {type(exc).__name__}: {exc}") from exc
    limit = max_texts if max_texts is not None else spec["max_texts"].get(split)
    if limit is not None and limit < len(ds):
        logger.info("%s: keeping the first %d of %d rows of split %r", preset, limit, len(ds), split)
        ds = ds.select(range(limit))
    return _column(ds, "text", spec["path"])


def _load_hub_dataset(
    name: str,
    config_name: str | None,
    split: str | None,
    text_field: str,
    cache_dir: str | os.PathLike | None,
) -> list[str]:
    import datasets

    try:
        ds = datasets.load_dataset(name, config_name, split=split or "train", cache_dir=_opt_str(cache_dir))
    except Exception as exc:
        hint = " (offline mode is set, so only a cached copy can be used)" if is_offline() else ""
        raise DataError(
            f"load_texts: could not load the dataset {name!r}{hint}: {type(exc).__name__}: {exc}. "
            "A local file or dataset directory works without internet."
        ) from exc
    return _column(ds, text_field, name)


# --------------------------------------------------------------------------------------------------
# Tokens and windows
# --------------------------------------------------------------------------------------------------


def join_texts(texts: str | Iterable[str]) -> str:
    """Join texts with ``JOIN_SEPARATOR`` ("\\n\\n"); a single string is returned unchanged."""
    if isinstance(texts, str):
        return texts
    return JOIN_SEPARATOR.join(texts)


def token_stream(
    texts_or_ids: str | Sequence[str] | torch.Tensor,
    tokenizer: Any = None,
    *,
    add_special_tokens: bool = True,
) -> torch.Tensor:
    """The 1-D token stream of joined texts, tokenized once (a 1-D tensor is returned as int64).

    ``add_special_tokens=True`` matches ``tokenizer(text)`` in the standard loaders (e.g. one BOS at
    the start of the stream for Llama tokenizers).
    """
    if isinstance(texts_or_ids, torch.Tensor):
        ids = texts_or_ids
        if ids.dim() == 2 and ids.shape[0] == 1:
            ids = ids[0]
        if ids.dim() != 1:
            raise DataError(f"expected a 1-D token tensor (or [1, T]), got shape {tuple(ids.shape)}.")
        _check_integer(ids)
        return ids.long()
    if tokenizer is None:
        raise DataError("texts need a tokenizer; pass tokenizer=... or pre-tokenized ids.")
    text = join_texts(texts_or_ids)
    encoded = tokenizer(
        text, add_special_tokens=add_special_tokens, return_attention_mask=False, verbose=False
    )
    return torch.tensor(encoded["input_ids"], dtype=torch.long)


def _check_integer(ids: torch.Tensor) -> None:
    if ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
        raise DataError(f"token ids must be an integer tensor, got {ids.dtype}.")


def _check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DataError(f"{name} must be a positive integer, got {value!r}.")


def calibration_windows(
    texts_or_ids: str | Sequence[str] | torch.Tensor,
    tokenizer: Any,
    nsamples: int,
    seqlen: int,
    seed: int,
    *,
    add_special_tokens: bool = True,
) -> torch.LongTensor:
    """``nsamples`` windows of ``seqlen`` tokens at random offsets, as ``[nsamples, seqlen]`` int64.

    Like the standard C4 loader, but on the joined token stream: each window's start is drawn
    uniformly from ``[0, T - seqlen]`` with ``random.Random(seed)``, so results depend only on the
    tokens and the seed. Windows may overlap. A 2-D tensor ``[R, L]`` is read as R separate sequences:
    each window first picks a row (uniformly), then an offset inside it, never crossing rows; ``[1, T]``
    is the same as the 1-D stream.
    """
    _check_positive("nsamples", nsamples)
    _check_positive("seqlen", seqlen)
    if isinstance(texts_or_ids, torch.Tensor) and texts_or_ids.dim() == 2 and texts_or_ids.shape[0] > 1:
        rows = texts_or_ids
        _check_integer(rows)
        if rows.shape[1] < seqlen:
            raise DataError(
                f"calibration_windows: the token rows have {rows.shape[1]} tokens; one window needs "
                f"seqlen={seqlen}. Use a smaller seqlen or longer sequences."
            )
        rng = random.Random(seed)
        out = torch.empty(nsamples, seqlen, dtype=torch.long)
        for k in range(nsamples):
            r = rng.randrange(rows.shape[0])
            start = rng.randint(0, rows.shape[1] - seqlen)
            out[k] = rows[r, start : start + seqlen]
        return out

    ids = token_stream(texts_or_ids, tokenizer, add_special_tokens=add_special_tokens)
    total = ids.numel()
    if total < seqlen:
        raise DataError(
            f"calibration_windows: the text has {total} tokens; one window needs seqlen={seqlen} tokens "
            f"({nsamples * seqlen} for {nsamples} non-overlapping windows). Add text or lower seqlen."
        )
    if nsamples * seqlen > total:
        logger.warning(
            "calibration_windows: %d x %d = %d tokens requested from a stream of %d tokens; windows "
            "will overlap, so calibration sees fewer distinct tokens.",
            nsamples,
            seqlen,
            nsamples * seqlen,
            total,
        )
    rng = random.Random(seed)
    starts = [rng.randint(0, total - seqlen) for _ in range(nsamples)]
    return torch.stack([ids[s : s + seqlen] for s in starts]).contiguous()


def evaluation_windows(
    text_or_ids: str | Sequence[str] | torch.Tensor,
    tokenizer: Any,
    seqlen: int,
    max_windows: int | None = None,
    *,
    add_special_tokens: bool = True,
) -> torch.LongTensor:
    """Non-overlapping windows ``ids[i*seqlen:(i+1)*seqlen]`` of the joined text, the first ``max_windows``.

    This is the standard WikiText-2 perplexity protocol; the last partial window is dropped so every
    window has the same length and the same number of scored tokens.
    """
    _check_positive("seqlen", seqlen)
    if max_windows is not None:
        _check_positive("max_windows", max_windows)
    ids = token_stream(text_or_ids, tokenizer, add_special_tokens=add_special_tokens)
    available = ids.numel() // seqlen
    if available == 0:
        raise DataError(
            f"evaluation_windows: the text has {ids.numel()} tokens; one window needs seqlen={seqlen}."
        )
    count = available if max_windows is None else min(max_windows, available)
    if max_windows is not None and max_windows > available:
        logger.warning(
            "evaluation_windows: %d windows of %d tokens requested, the text gives only %d.",
            max_windows,
            seqlen,
            available,
        )
    return ids[: count * seqlen].reshape(count, seqlen).clone()


def _context_length(model_config: Any) -> tuple[str, int] | None:
    config = getattr(model_config, "config", model_config)  # a model is accepted too
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for attr in CONTEXT_ATTRIBUTES:
        value = config.get(attr) if isinstance(config, dict) else getattr(config, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return attr, value
    return None


def resolve_seqlen(seqlen: int, model_config: Any) -> int:
    """The window length to use: ``seqlen``, lowered (with a warning) to the model's context length.

    ``seqlen`` must be given: defaulting to ``max_position_embeddings`` is how 128k-context models end
    up allocating tens of GiB for calibration. Accepts a config, a dict, or a model.
    """
    if seqlen is None:
        raise DataError(
            "seqlen must be given explicitly (the standard protocol uses 2048); it is never taken "
            "from the model's maximum context."
        )
    _check_positive("seqlen", seqlen)
    found = _context_length(model_config)
    if found is None:
        logger.debug("resolve_seqlen: the model config states no context length; using seqlen=%d", seqlen)
        return seqlen
    attr, limit = found
    if seqlen > limit:
        logger.warning("seqlen=%d exceeds the model's %s=%d; using seqlen=%d.", seqlen, attr, limit, limit)
        return limit
    return seqlen

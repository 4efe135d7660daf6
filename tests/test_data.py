"""Text sources, calibration/evaluation windows, seqlen capping, offline corpora (all offline)."""

from __future__ import annotations

import importlib.metadata
import json
import logging
import random
import socket
from pathlib import Path

import pytest
import torch

from optimum_statprune.data import corpora
from optimum_statprune.data.texts import (
    JOIN_SEPARATOR,
    DataError,
    calibration_windows,
    evaluation_windows,
    is_offline,
    load_texts,
    resolve_seqlen,
    token_stream,
)

WORDS = [
    "the",
    "a",
    "of",
    "pruning",
    "model",
    "weight",
    "token",
    "layer",
    "sparse",
    "dense",
    "mask",
    "row",
    "column",
    "energy",
    "scale",
    "window",
]


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test instead of reaching (or waiting on) the network."""

    def refuse(*args, **kwargs):
        raise OSError("network access is disabled in tests")

    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)


@pytest.fixture(scope="module")
def tokenizer():
    """A word-level tokenizer built in memory: one token per word, no special tokens added."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]")


def make_text(n_words: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n_words))


# ------------------------------------------------------------------------------------ sources


def test_list_source_and_type_check():
    assert load_texts(["a b", "c"]) == ["a b", "c"]
    assert load_texts(("a", "b", "c"), max_texts=2) == ["a", "b"]
    with pytest.raises(DataError, match="only strings"):
        load_texts(["a", 3])  # type: ignore[list-item]


def test_txt_whole_and_lines(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("first line here\n\nsecond line\n", encoding="utf-8")
    assert load_texts(path) == ["first line here\n\nsecond line\n"]
    assert load_texts(str(path), lines=True) == ["first line here", "second line"]


def test_missing_local_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_texts(str(tmp_path / "nope.jsonl"))


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".parquet"])
def test_structured_files(tmp_path, suffix):
    rows = [{"text": "alpha beta", "id": 1}, {"text": "gamma", "id": 2}, {"text": "delta", "id": 3}]
    path = tmp_path / f"data{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(rows), encoding="utf-8")
    elif suffix == ".jsonl":
        path.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), path)
    cache = tmp_path / "hf-cache"
    assert load_texts(path, cache_dir=cache) == ["alpha beta", "gamma", "delta"]
    with pytest.raises(DataError, match=r"no column 'body'.*text"):
        load_texts(path, text_field="body", cache_dir=cache)


def test_local_dataset_directories(tmp_path):
    import datasets

    saved = tmp_path / "saved"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"content": ["one", "two"]}),
            "test": datasets.Dataset.from_dict({"content": ["three"]}),
        }
    ).save_to_disk(str(saved))
    assert load_texts(saved, text_field="content") == ["one", "two"]
    assert load_texts(saved, split="test", text_field="content") == ["three"]
    with pytest.raises(DataError, match="no split 'validation'"):
        load_texts(saved, split="validation", text_field="content")

    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "train.jsonl").write_text('{"text": "x y"}\n{"text": "z"}\n', encoding="utf-8")
    assert load_texts(folder, cache_dir=tmp_path / "hf-cache") == ["x y", "z"]


def _online(monkeypatch) -> None:
    """Both libraries' own offline switches off (conftest turns them on for every test)."""
    import datasets.config
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", False)


@pytest.mark.parametrize("preset", ["c4", "wikitext2"])
@pytest.mark.parametrize("switch", ["huggingface_hub", "datasets"])
def test_hub_presets_fail_at_once_offline(monkeypatch, preset, switch):
    """Offline mode is what huggingface_hub and datasets themselves read (HF_HUB_OFFLINE,
    TRANSFORMERS_OFFLINE, HF_DATASETS_OFFLINE at import), so load_dataset is never tried."""
    import datasets
    import datasets.config
    from huggingface_hub import constants

    def forbidden(*args, **kwargs):
        raise AssertionError("load_dataset must not be called offline")

    monkeypatch.setattr(datasets, "load_dataset", forbidden)
    _online(monkeypatch)
    assert not is_offline()
    if switch == "huggingface_hub":
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    else:
        monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    assert is_offline()
    with pytest.raises(DataError, match="needs internet") as info:
        load_texts(preset, split="train")
    assert "local" in str(info.value) and "offline" in str(info.value)


def test_hub_presets_fail_when_unreachable(monkeypatch):
    """Online but the Hub cannot be reached: datasets' own error, reported with the local alternatives."""
    import datasets

    _online(monkeypatch)

    def connection_error(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'allenai/c4' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", connection_error)
    with pytest.raises(DataError, match="needs internet.*Couldn't reach"):
        load_texts("c4", split="validation")
    with pytest.raises(DataError, match="splits"):
        load_texts("c4", split="test")


def test_texts_and_corpora_do_not_import_each_other_for_data_error():
    """DataError lives in data/errors.py; corpora.py (which texts.py uses) never imports texts.py."""
    import ast

    from optimum_statprune.data import errors

    source = Path(corpora.__file__).read_text(encoding="utf-8")
    imported = {n.module for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ImportFrom)}
    assert "texts" not in imported and "errors" in imported
    assert DataError is errors.DataError and corpora.DataError is errors.DataError


def test_generic_hub_name_error_is_wrapped(monkeypatch):
    import datasets

    def fail(*args, **kwargs):
        raise FileNotFoundError("not found")

    monkeypatch.setattr(datasets, "load_dataset", fail)
    with pytest.raises(DataError, match="could not load the dataset 'someone/corpus'.*local file"):
        load_texts("someone/corpus", config_name="en", split="train")


# ------------------------------------------------------------------------------------ windows


def test_texts_are_joined_then_tokenized_once(tokenizer):
    texts = [make_text(30, 1), make_text(40, 2)]
    joined = token_stream(texts, tokenizer)
    assert torch.equal(joined, token_stream(JOIN_SEPARATOR.join(texts), tokenizer))
    assert joined.dtype == torch.long and joined.numel() == 70


def test_calibration_windows_deterministic_and_seeded(tokenizer):
    text = make_text(2000)
    a = calibration_windows(text, tokenizer, nsamples=8, seqlen=32, seed=0)
    b = calibration_windows(text, tokenizer, nsamples=8, seqlen=32, seed=0)
    c = calibration_windows(text, tokenizer, nsamples=8, seqlen=32, seed=1)
    assert a.shape == (8, 32) and a.dtype == torch.long
    assert torch.equal(a, b)
    assert not torch.equal(a, c)

    # Every window is a contiguous slice of the stream, and ids give the same windows as text.
    ids = token_stream(text, tokenizer)
    slices = {tuple(ids[s : s + 32].tolist()) for s in range(ids.numel() - 31)}
    assert all(tuple(w.tolist()) in slices for w in a)
    assert torch.equal(calibration_windows(ids, None, 8, 32, 0), a)
    assert torch.equal(calibration_windows(ids[None], None, 8, 32, 0), a)


def test_calibration_windows_does_not_touch_global_rng(tokenizer):
    random.seed(123)
    torch.manual_seed(123)
    expected = (random.random(), torch.rand(1))
    random.seed(123)
    torch.manual_seed(123)
    calibration_windows(make_text(500), tokenizer, 4, 16, seed=7)
    assert (random.random(), torch.rand(1)) == expected


def test_calibration_windows_from_rows_stay_inside_rows():
    rows = torch.arange(4 * 50).reshape(4, 50)
    w = calibration_windows(rows, None, nsamples=20, seqlen=10, seed=3)
    assert w.shape == (20, 10)
    assert torch.equal(w[:, -1] - w[:, 0], torch.full((20,), 9))  # contiguous within one row
    assert torch.equal(w[:, 0] // 50, w[:, -1] // 50)
    with pytest.raises(DataError, match="50 tokens"):
        calibration_windows(rows, None, nsamples=1, seqlen=51, seed=0)


def test_too_little_text_says_how_much(tokenizer):
    with pytest.raises(DataError, match=r"has 20 tokens; one window needs seqlen=64"):
        calibration_windows(make_text(20), tokenizer, nsamples=4, seqlen=64, seed=0)
    with pytest.raises(DataError, match=r"has 20 tokens; one window needs seqlen=64"):
        evaluation_windows(make_text(20), tokenizer, seqlen=64)


def test_overlapping_calibration_windows_warn(tokenizer, caplog):
    with caplog.at_level(logging.WARNING, logger="optimum_statprune.data.texts"):
        w = calibration_windows(make_text(100), tokenizer, nsamples=10, seqlen=50, seed=0)
    assert w.shape == (10, 50)
    assert "overlap" in caplog.text


def test_bad_arguments():
    with pytest.raises(DataError, match="nsamples"):
        calibration_windows(torch.arange(100), None, 0, 10, 0)
    with pytest.raises(DataError, match="tokenizer"):
        calibration_windows("some text", None, 1, 1, 0)
    with pytest.raises(DataError, match="integer"):
        evaluation_windows(torch.rand(100), None, 10)


def test_evaluation_windows_non_overlapping(tokenizer):
    text = make_text(1000)
    ids = token_stream(text, tokenizer)
    w = evaluation_windows(text, tokenizer, seqlen=64)
    assert w.shape == (1000 // 64, 64)
    for i in range(w.shape[0]):
        assert torch.equal(w[i], ids[i * 64 : (i + 1) * 64])
    first = evaluation_windows(ids, None, seqlen=64, max_windows=3)
    assert torch.equal(first, w[:3])


def test_evaluation_windows_more_than_available_warns(caplog):
    with caplog.at_level(logging.WARNING, logger="optimum_statprune.data.texts"):
        w = evaluation_windows(torch.arange(100), None, seqlen=30, max_windows=10)
    assert w.shape == (3, 30)
    assert "only 3" in caplog.text


# ------------------------------------------------------------------------------------ seqlen


def test_resolve_seqlen_caps_with_warning(caplog):
    from transformers import GPT2Config, LlamaConfig

    llama = LlamaConfig(max_position_embeddings=128)
    with caplog.at_level(logging.WARNING, logger="optimum_statprune.data.texts"):
        assert resolve_seqlen(2048, llama) == 128
    assert "2048" in caplog.text and "max_position_embeddings=128" in caplog.text

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="optimum_statprune.data.texts"):
        assert resolve_seqlen(64, llama) == 64
        assert resolve_seqlen(512, {"some": 1}) == 512
    assert caplog.text == ""
    assert resolve_seqlen(4096, GPT2Config(n_positions=1024)) == 1024
    assert resolve_seqlen(4096, {"n_positions": 256}) == 256


def test_resolve_seqlen_never_defaults_to_max_context():
    from transformers import LlamaConfig

    with pytest.raises(DataError, match="explicitly"):
        resolve_seqlen(None, LlamaConfig(max_position_embeddings=131072))  # type: ignore[arg-type]
    with pytest.raises(DataError, match="positive"):
        resolve_seqlen(0, LlamaConfig())


# ------------------------------------------------------------------------------------ corpora

def _gensim_installed() -> bool:
    try:
        importlib.metadata.distribution("gensim")
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


needs_gensim = pytest.mark.skipif(not _gensim_installed(), reason="pip install gensim==4.4.0")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """Both corpora extracted from the installed gensim wheel into a data directory (as users copy them)."""
    import os

    saved = os.environ.pop(corpora.DATA_DIR_ENV, None)
    try:
        folder = tmp_path_factory.mktemp("corpora")
        for name, spec in corpora.CORPORA.items():
            text = corpora.corpus_text(name, cache_dir=folder / "cache")
            (folder / spec["filename"]).write_bytes(text.encode("utf-8"))
    finally:
        if saved is not None:
            os.environ[corpora.DATA_DIR_ENV] = saved
    return folder


@needs_gensim
@pytest.mark.parametrize("name", ["enwiki-excerpt", "lee-background"])
def test_extraction_from_gensim_matches_the_reference_bytes(name, data_dir):
    """The extraction reproduces protocol A's texts byte for byte (their sha256 is in corpora.py)."""
    text = (data_dir / corpora.CORPORA[name]["filename"]).read_bytes()
    assert corpora.sha256_text(text.decode("utf-8")) == corpora.EXPECTED_SHA256[name]


@needs_gensim
@pytest.mark.parametrize("name", ["enwiki-excerpt", "lee-background"])
def test_corpus_from_data_dir_matches_reference(name, monkeypatch, data_dir):
    monkeypatch.delenv(corpora.DATA_DIR_ENV, raising=False)
    text = corpora.corpus_text(name, data_dir=data_dir)
    assert corpora.sha256_text(text) == corpora.EXPECTED_SHA256[name]

    monkeypatch.setenv(corpora.DATA_DIR_ENV, str(data_dir))
    assert corpora.corpus_text(name) == text
    assert load_texts(name) == [text]  # preset == the file's whole text


@needs_gensim
def test_protocol_a_sources_agree(monkeypatch, tokenizer, data_dir):
    """The preset name and the file path give the same token stream."""
    monkeypatch.delenv(corpora.DATA_DIR_ENV, raising=False)
    by_name = calibration_windows(load_texts("lee-background"), tokenizer, 4, 64, seed=0)
    by_path = calibration_windows(load_texts(data_dir / "lee_background.txt"), tokenizer, 4, 64, seed=0)
    assert torch.equal(by_name, by_path)


def test_corpus_errors(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="unknown corpus"):
        corpora.corpus_text("wiki")
    with pytest.raises(DataError, match="enwiki_excerpt.txt"):
        corpora.corpus_text("enwiki-excerpt", data_dir=tmp_path)

    monkeypatch.delenv(corpora.DATA_DIR_ENV, raising=False)

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(ImportError, match=r"pip install gensim==4\.4\.0"):
        corpora.corpus_text("lee-background", cache_dir=tmp_path)
    with pytest.raises(DataError, match=r"pip install gensim==4\.4\.0"):
        corpora.corpus_text("enwiki-excerpt", cache_dir=tmp_path / "empty")


def test_enwiki_cache_is_written_once_atomically(tmp_path, monkeypatch):
    monkeypatch.delenv(corpora.DATA_DIR_ENV, raising=False)
    calls = []

    def fake_extract(path):
        calls.append(path)
        return "= Fake = \n\nsome text\n\n"

    monkeypatch.setattr(corpora, "gensim_data_file", lambda rel: tmp_path / "dump.bz2")
    monkeypatch.setattr(corpora, "extract_enwiki_excerpt", fake_extract)
    cache = tmp_path / "cache"
    assert corpora.corpus_text("enwiki-excerpt", cache_dir=cache) == "= Fake = \n\nsome text\n\n"
    assert corpora.corpus_text("enwiki-excerpt", cache_dir=cache) == "= Fake = \n\nsome text\n\n"
    assert len(calls) == 1
    assert [p.name for p in cache.iterdir()] == [
        f"enwiki_excerpt-gensim4.4.0-v{corpora.EXTRACTION_VERSION}.txt"
    ]

    monkeypatch.setenv(corpora.CACHE_ENV, str(tmp_path / "env-cache"))
    assert corpora.default_cache_dir() == tmp_path / "env-cache"

"""The two offline corpora of protocol A, rebuilt from the ``gensim==4.4.0`` wheel on PyPI.

Machines without internet can still install a wheel, so the calibration and evaluation texts are
derived from data files that ship inside gensim (``docs/protocols.md`` states sources and licences):

- ``"lee-background"``: ``gensim/test/test_data/lee_background.cor`` unchanged (300 ABC news
  articles, one per line).
- ``"enwiki-excerpt"``: ``enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``,
  namespace-0 pages that are not redirects, passed through ``gensim.corpora.wikicorpus.filter_wiki``,
  then cleaned line by line (``extract_enwiki_excerpt``). The extraction is reproduced byte for byte
  (``EXPECTED_SHA256``).

Where the text comes from, first match wins:

1. ``data_dir=`` or the ``OPTIMUM_STATPRUNE_DATA_DIR`` environment variable: a directory holding
   ``enwiki_excerpt.txt`` / ``lee_background.txt`` (a copy made earlier), read directly;
2. the cache (``cache_dir=``, ``OPTIMUM_STATPRUNE_CACHE``, else ``$XDG_CACHE_HOME/optimum_statprune``
   or ``~/.cache/optimum_statprune``), written atomically after the first extraction;
3. the installed gensim package (found through ``importlib.metadata``, without importing gensim for
   the Lee file).
"""

from __future__ import annotations

import bz2
import hashlib
import importlib.metadata
import importlib.util
import logging
import os
from pathlib import Path

from ..checkpoint.atomic import atomic_write_text
from .errors import DataError

logger = logging.getLogger(__name__)

GENSIM_VERSION = "4.4.0"
DATA_DIR_ENV = "OPTIMUM_STATPRUNE_DATA_DIR"
CACHE_ENV = "OPTIMUM_STATPRUNE_CACHE"
EXTRACTION_VERSION = 1  # bump when extract_enwiki_excerpt changes, so stale caches are not reused

CORPORA: dict[str, dict[str, str]] = {
    "enwiki-excerpt": {
        "filename": "enwiki_excerpt.txt",
        "source": "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2",
    },
    "lee-background": {
        "filename": "lee_background.txt",
        "source": "gensim/test/test_data/lee_background.cor",
    },
}

EXPECTED_SHA256 = {
    "enwiki-excerpt": "62cafa641cb8e4c11dc56cd405b57ce5ec776c0074372e359840b060c819d340",
    "lee-background": "5d78d6dafd953bbf65797bef09a9ffb9ec430583381be705f8fd460000f370fb",
}
"""sha256 of the UTF-8 bytes of each text extracted from gensim 4.4.0 (the protocol-A reference)."""

MIN_LINE_WORDS = 5
MIN_ARTICLE_WORDS = 50  # articles are kept when they have MORE than this many words
TABLE_CHARS = ("|", "!", "{")


class GensimMissingError(DataError, ImportError):
    """gensim (the wheel the offline corpora come from) is not installed."""


def _check_name(name: str) -> dict[str, str]:
    if name not in CORPORA:
        raise DataError(f"unknown corpus {name!r}; choose one of {sorted(CORPORA)}.")
    return CORPORA[name]


def sha256_text(text: str) -> str:
    """sha256 of the UTF-8 encoding of ``text`` (how the reference hashes are stated)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def default_cache_dir() -> Path:
    """``$OPTIMUM_STATPRUNE_CACHE``, else ``$XDG_CACHE_HOME/optimum_statprune``, else ``~/.cache/...``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(base).expanduser() / "optimum_statprune"


def gensim_data_file(relative: str) -> Path:
    """Locate a file of the installed gensim distribution without importing gensim."""
    try:
        dist = importlib.metadata.distribution("gensim")
    except importlib.metadata.PackageNotFoundError:
        raise GensimMissingError(
            "The offline corpora are extracted from the gensim wheel, which is not installed: "
            f"pip install gensim=={GENSIM_VERSION} (or point {DATA_DIR_ENV} at a directory holding "
            "enwiki_excerpt.txt and lee_background.txt)."
        ) from None
    if dist.version != GENSIM_VERSION:
        logger.warning(
            "gensim %s is installed; the corpora are defined on gensim %s and may differ.",
            dist.version,
            GENSIM_VERSION,
        )
    for file in dist.files or ():
        if file.as_posix() == relative:
            path = Path(str(dist.locate_file(file)))
            if path.is_file():
                return path
    spec = importlib.util.find_spec("gensim")  # a top-level find_spec does not import the package
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            path = Path(location).parent / relative
            if path.is_file():
                return path
    raise DataError(
        f"gensim {dist.version} is installed but has no {relative}; reinstall gensim=={GENSIM_VERSION}."
    )


def extract_enwiki_excerpt(bz2_path: str | os.PathLike) -> str:
    """Plain text of the gensim enwiki test dump, as described in docs/protocols.md.

    Per page of namespace 0 that is not a redirect: ``filter_wiki``; per line: strip, keep it when it
    has >= 5 whitespace-separated words (counted before emphasis removal) and does not start with a
    table character (``|``, ``!``, ``{``), then remove ``'''`` and ``''``; keep the article when its
    kept lines have more than 50 words; write ``" = Title = \\n\\n"`` + lines joined by newlines +
    ``"\\n\\n"``.
    """
    try:
        from gensim.corpora.wikicorpus import extract_pages, filter_wiki
    except ImportError as exc:
        raise GensimMissingError(
            f"Extracting 'enwiki-excerpt' needs gensim's filter_wiki: pip install gensim=={GENSIM_VERSION}."
        ) from exc

    parts: list[str] = []
    with bz2.open(bz2_path, "rb") as f:
        for title, text, _pageid in extract_pages(f, filter_namespaces=("0",)):
            if not text or text.lstrip().lower().startswith("#redirect"):
                continue
            kept = []
            for line in filter_wiki(text).split("\n"):
                line = line.strip()
                if len(line.split()) < MIN_LINE_WORDS or line.startswith(TABLE_CHARS):
                    continue
                kept.append(line.replace("'''", "").replace("''", ""))
            if sum(len(line.split()) for line in kept) <= MIN_ARTICLE_WORDS:
                continue
            parts.append(f" = {title} = \n\n" + "\n".join(kept) + "\n\n")
    return "".join(parts)


def _read(path: Path) -> str:
    with open(path, encoding="utf-8", newline="") as f:  # newline="": keep the exact bytes
        return f.read()


def _verify(name: str, text: str, where: str) -> None:
    digest = sha256_text(text)
    if digest != EXPECTED_SHA256[name]:
        logger.warning(
            "%s from %s has sha256 %s, not the reference %s; perplexities will not be comparable.",
            name,
            where,
            digest,
            EXPECTED_SHA256[name],
        )


def corpus_path(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """A UTF-8 file holding the corpus text (data directory, cache, or gensim's own file)."""
    spec = _check_name(name)
    data_dir = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV) or None
    if data_dir is not None:
        path = Path(data_dir).expanduser() / spec["filename"]
        if not path.is_file():
            raise DataError(
                f"corpus {name!r}: {path} does not exist (data_dir / {DATA_DIR_ENV} must hold "
                f"{spec['filename']})."
            )
        return path
    if name == "lee-background":
        return gensim_data_file(spec["source"])  # used unchanged: no copy needed

    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    cached = cache / f"{Path(spec['filename']).stem}-gensim{GENSIM_VERSION}-v{EXTRACTION_VERSION}.txt"
    if cached.is_file():
        return cached
    source = gensim_data_file(spec["source"])
    logger.info("Extracting %s from %s (once; cached at %s)", name, source, cached)
    text = extract_enwiki_excerpt(source)
    _verify(name, text, str(source))
    cached.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(cached, text)
    return cached


def corpus_text(
    name: str,
    *,
    data_dir: str | os.PathLike | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> str:
    """The text of an offline corpus: ``"enwiki-excerpt"`` or ``"lee-background"``.

    The first call extracts ``enwiki-excerpt`` from gensim (a few seconds) and caches it; if the cache
    directory is not writable the text is extracted in memory each time. A text whose sha256 differs
    from the reference is returned with a warning.
    """
    spec = _check_name(name)
    try:
        path = corpus_path(name, data_dir=data_dir, cache_dir=cache_dir)
    except OSError as exc:  # an unwritable cache: extract without caching
        logger.warning("Could not cache %s (%s); extracting in memory.", name, exc)
        text = extract_enwiki_excerpt(gensim_data_file(spec["source"]))
        _verify(name, text, "gensim")
        return text
    text = _read(path)
    _verify(name, text, str(path))
    return text

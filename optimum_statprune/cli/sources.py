"""Text sources named on the command line, read with one-line usage errors."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import UsageError
from .logs import quiet_libraries
from .names import PRESETS_HINT


def eval_split(source: str, split: str | None = None) -> str | None:
    """The evaluation split of a Hub preset (c4: validation, wikitext2: test); else ``split``."""
    if split is not None:
        return split
    from ..data.texts import PRESET_ALIASES

    preset = PRESET_ALIASES.get(source.lower())
    return {"c4": "validation", "wikitext2": "test"}.get(preset) if preset else None


def load_source(source: str, flag: str, split: str | None = None, text_field: str = "text") -> list[str]:
    """Texts of a source, with one-line usage errors for missing or unreadable local files."""
    from ..data.corpora import CORPORA
    from ..data.errors import DataError
    from ..data.texts import LOCAL_FORMATS, load_texts

    path = Path(source).expanduser()
    looks_local = path.suffix.lower() in {".txt", *LOCAL_FORMATS} or source.startswith((".", "/", "~"))
    if source not in CORPORA and not path.exists() and looks_local:
        raise UsageError(f"{flag} {source}: no such file; give {PRESETS_HINT}")
    if path.exists() and not os.access(path, os.R_OK):
        raise UsageError(f"{flag} {source}: permission denied; make it readable or choose another source")
    quiet_libraries()
    try:
        texts = load_texts(source, split=split, text_field=text_field)
    except ImportError:
        raise  # gensim missing: errors.describe_error prints its pip command
    except DataError as exc:
        message = str(exc).removeprefix("load_texts: ")
        raise UsageError(f"{flag} {source}: {message}") from exc
    except UnicodeDecodeError as exc:
        raise UsageError(f"{flag} {source}: not UTF-8 text ({exc.reason} at byte {exc.start}); give a UTF-8 text file") from exc
    except OSError as exc:
        raise UsageError(f"{flag} {source}: cannot read it ({exc.strerror or exc})") from exc
    if not any(t.strip() for t in texts):
        raise UsageError(f"{flag} {source}: holds no text")
    return texts

"""The Hub transport that push, download and verify share: tokens, endpoints, retries, one-line errors.

Retries: ``huggingface_hub`` retries some requests itself with ``http_backoff`` (preupload, the commit
of its Xet upload pipeline, file metadata and file bytes of downloads). Others it sends once:
``create_repo``, ``repo_info`` (the first call of ``snapshot_download``) and the commit without
``hf_xet``. ``call`` retries a whole operation on exactly what ``http_backoff`` treats as transient (its
default status codes and exception types, read from its signature, so this module imports no HTTP
library) with its doubling, capped wait. Re-running is safe for every operation here: create is
``exist_ok``, downloads are idempotent, and a re-run ``upload_folder`` skips files already committed.

Privacy: every message and log line this module writes, and the ``huggingface_hub`` log lines emitted
during a call, pass through ``redact``: credentials in URLs (``http://user:pw@host``) and the token
become ``***``. A token can come from ``token=``, a ``token_file`` (so it never sits in the process
list) or, as ``huggingface_hub`` does by default, ``HF_TOKEN`` / the stored login.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import re
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TypeVar

from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import http_backoff, validate_repo_id

logger = logging.getLogger(__name__)

T = TypeVar("T")

_BACKOFF = inspect.signature(http_backoff).parameters
TRANSIENT_STATUS: tuple[int, ...] = tuple(_BACKOFF["retry_on_status_codes"].default)
TRANSIENT_EXCEPTIONS: tuple[type[BaseException], ...] = tuple(_BACKOFF["retry_on_exceptions"].default)
MAX_WAIT: float = float(_BACKOFF["max_wait_time"].default)

LOGIN_HINT = "log in with `huggingface-cli login` (or `hf auth login`), or set HF_TOKEN / pass token= or token_file="
_URL_CREDENTIALS = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@")
_HF_TOKEN = re.compile(r"\bhf_[A-Za-z0-9]{8,}\b")


class HubError(RuntimeError):
    """A Hub operation failed; the message says what happened and what to do, in one line."""


# ------------------------------------------------------------------------------------------- names
def is_hub_id(name: object) -> bool:
    """The package's one rule for "is this a Hub repo id": ``name`` or ``namespace/name`` as
    ``huggingface_hub.utils.validate_repo_id`` accepts it (Hub characters, at most 96 per part, no
    ``--`` or ``..``, no leading or trailing ``-``/``.``). Says nothing about local paths."""
    if not isinstance(name, str) or not name:
        return False
    try:
        validate_repo_id(name)
    except ValueError:  # HFValidationError
        return False
    return True


def looks_like_hub_id(name: object) -> bool:
    """``is_hub_id`` and not a path that exists here: how a recorded model name is told from a local
    directory (a base model named in a manifest, a command-line argument)."""
    return is_hub_id(name) and not os.path.exists(str(name))


# ------------------------------------------------------------------------------------------- secrets
def redact(text: object, secrets: Iterable[str | None] = ()) -> str:
    """``text`` with URL credentials, ``hf_...`` tokens and each of ``secrets`` replaced by ``***``."""
    out = _URL_CREDENTIALS.sub(r"\g<scheme>***@", str(text))
    for secret in secrets:
        if secret and len(secret) >= 4:
            out = out.replace(secret, "***")
    return _HF_TOKEN.sub("hf_***", out)


def resolve_token(token: str | None = None, token_file: str | os.PathLike | None = None) -> str | None:
    """The token to send: ``token``, else the stripped content of ``token_file``, else None (then
    ``huggingface_hub`` uses ``HF_TOKEN`` or the stored login)."""
    if token is not None and token_file is not None:
        raise HubError("give either token or token_file, not both")
    if token_file is None:
        return token or None
    path = Path(token_file).expanduser()
    try:
        value = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise HubError(f"token file {path} does not exist; write the token into it (one line)") from None
    except OSError as e:
        raise HubError(f"cannot read token file {path}: {e.strerror or type(e).__name__}") from None
    if not value or any(c.isspace() for c in value):
        raise HubError(f"token file {path} must hold exactly one token (one line, no spaces)")
    return value


def default_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


class _Redacting(logging.Filter):
    def __init__(self, secrets: list[str]):
        super().__init__()
        self.secrets = secrets

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message, self.secrets)
        if clean != message:
            record.msg, record.args = clean, None
        return True


# Loggers that write URLs during a Hub call: huggingface_hub's, its HTTP client's (httpx2 logs every
# request URL at INFO; httpx / httpcore under huggingface_hub 1.x) and this package's.
_LOGGED_BY = ("huggingface_hub", "httpx2", "httpcore2", "httpx", "httpcore", "optimum_statprune")


@contextlib.contextmanager
def redacted_logs(secrets: Iterable[str | None] = ()) -> Iterator[None]:
    """While the block runs, log records of ``_LOGGED_BY`` pass through ``redact`` (a logger's filters
    see only its own records, so each of those loggers gets one)."""
    names = [n for n in list(logging.Logger.manager.loggerDict) if n.split(".")[0] in _LOGGED_BY]
    loggers = [logging.getLogger(n) for n in {*names, *_LOGGED_BY, __name__}]
    flt = _Redacting([s for s in secrets if s])
    for lg in loggers:
        lg.addFilter(flt)
    try:
        yield
    finally:
        for lg in loggers:
            lg.removeFilter(flt)


# ------------------------------------------------------------------------------------------- calls
def call(
    fn: Callable[[], T], what: str, repo_id: str, *, endpoint: str | None = None, token: str | None = None,
    revision: str | None = None, max_retries: int = 3, retry_wait: float = 1.0,
) -> T:
    """Run the Hub operation ``fn``; re-run it on transient failures (see the module docstring) up to
    ``max_retries`` times, waiting ``retry_wait`` seconds, doubling, capped as ``http_backoff`` caps;
    turn a known failure into a one-line ``HubError`` (with secrets redacted)."""
    where = redact(endpoint or default_endpoint(), [token])
    attempt = 0
    with redacted_logs([token]):
        while True:
            try:
                return fn()
            except Exception as e:  # noqa: BLE001 - sorted below; others re-raised unless their text holds a secret
                if is_transient(e) and attempt < max_retries:
                    wait = min(retry_wait * 2**attempt, MAX_WAIT)
                    attempt += 1
                    logger.warning("%s failed (%s); retry %d/%d in %.1f s", what, redact(short(e), [token]),
                                   attempt, max_retries, wait)
                    time.sleep(wait)
                    continue
                leaky = redact(str(e), [token]) != str(e)
                message = translate(e, what, repo_id, where, attempt + 1, revision)
                if message is None and not leaky:
                    raise  # not the Hub's error, and nothing secret in it: as it is
                message = message or f"cannot {what}: {type(e).__name__}: {short(e)}"
                raise HubError(redact(message, [token])) from (None if leaky else e)


def _root(error: BaseException) -> BaseException:
    """The error a ``huggingface_hub`` fallback wrapped: ``snapshot_download`` and ``hf_hub_download``
    raise ``LocalEntryNotFoundError`` from the request error when nothing is cached."""
    if isinstance(error, LocalEntryNotFoundError) and error.__cause__ is not None:
        return error.__cause__
    return error


def status_of(error: BaseException) -> int | None:
    """The HTTP status of a ``huggingface_hub`` HTTP error (or of the error it wrapped), else None."""
    error = _root(error)
    response = getattr(error, "response", None) if isinstance(error, HfHubHTTPError) else None
    status = getattr(response, "status_code", None)
    return status if isinstance(status, int) else None


def is_transient(error: BaseException) -> bool:
    """What ``http_backoff`` would retry: its status codes, or its network exception types."""
    status = status_of(error)
    if status is not None:
        return status in TRANSIENT_STATUS
    return isinstance(_root(error), TRANSIENT_EXCEPTIONS)


def short(error: BaseException) -> str:
    """``HTTP 503`` or the first line of the error, at most 200 characters."""
    status = status_of(error)
    if status:
        return f"HTTP {status}"
    root = _root(error)
    text = str(root).strip()
    return text.splitlines()[0][:200] if text else type(root).__name__


def translate(error: BaseException, what: str, repo_id: str, where: str, attempts: int,
              revision: str | None = None) -> str | None:
    """The one-line message for a failed Hub operation, or None for an error that is not the Hub's."""
    namespace = repo_id.split("/")[0] if "/" in repo_id else "your namespace"
    root, status = _root(error), status_of(error)
    head = f"cannot {what}:"
    if isinstance(root, OfflineModeIsEnabled) or isinstance(error, OfflineModeIsEnabled):
        return f"{head} offline mode is on (HF_HUB_OFFLINE=1); unset it to reach {where}"
    if isinstance(root, RevisionNotFoundError):
        return f"{head} revision {revision or 'main'!r} does not exist in {repo_id} on {where}"
    if isinstance(root, GatedRepoError):
        return f"{head} {repo_id} is gated; accept its terms on the Hub, then {LOGIN_HINT}"
    if isinstance(root, RemoteEntryNotFoundError):
        return f"{head} a file is missing in {repo_id} on {where}: {short(error)}"
    if isinstance(root, RepositoryNotFoundError) or (isinstance(error, LocalEntryNotFoundError) and status == 404):
        return (f"{head} repository {repo_id} not found on {where} (or it is private and this token cannot "
                f"read it); check the id, or {LOGIN_HINT}")
    if status == 401:
        return (f"{head} authentication failed on {where} (token missing, invalid or expired); {LOGIN_HINT} "
                "with a token that has write access")
    if status == 403:
        return (f"{head} the token has no write access to {namespace!r} on {where}; use a write token "
                f"(https://huggingface.co/settings/tokens) for that user or organization, then {LOGIN_HINT}")
    if status in TRANSIENT_STATUS:
        return f"{head} {where} kept answering HTTP {status} ({attempts} attempts); try again later"
    if is_transient(error):
        return (f"{head} {where} could not be reached ({short(error)}, {attempts} attempts); check the network, "
                "proxy settings or HF_ENDPOINT")
    if isinstance(error, LocalEntryNotFoundError):
        return f"{head} {where} could not be reached and nothing is cached; check the network"
    if status is not None:
        return f"{head} {where} answered HTTP {status}: {short(error)}"
    return None


# ------------------------------------------------------------------------------------------- downloads
def download(
    repo_id: str,
    revision: str | None = None,
    token: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    endpoint: str | None = None,
    local_dir: str | os.PathLike | None = None,
    allow_patterns: list[str] | None = None,
    *,
    token_file: str | os.PathLike | None = None,
    max_retries: int = 2,
    retry_wait: float = 1.0,
) -> str:
    """``snapshot_download`` of a repo, with ``HubError`` for a missing repo, revision or access."""
    from huggingface_hub import snapshot_download

    secret = resolve_token(token, token_file)

    def fetch() -> str:
        return snapshot_download(
            repo_id, revision=revision, token=secret, cache_dir=cache_dir, endpoint=endpoint,
            local_dir=local_dir, allow_patterns=allow_patterns,
        )

    return call(fetch, f"download {repo_id}", repo_id, endpoint=endpoint, token=secret, revision=revision,
                max_retries=max_retries, retry_wait=retry_wait)


def download_file(
    repo_id: str, filename: str, revision: str | None = None, token: str | None = None, *,
    endpoint: str | None = None, cache_dir: str | os.PathLike | None = None,
    token_file: str | os.PathLike | None = None, max_retries: int = 2, retry_wait: float = 1.0,
) -> str:
    """``hf_hub_download`` of one file, with the same errors as ``download``."""
    from huggingface_hub import hf_hub_download

    secret = resolve_token(token, token_file)

    def fetch() -> str:
        return hf_hub_download(repo_id, filename, revision=revision, token=secret, endpoint=endpoint, cache_dir=cache_dir)

    return call(fetch, f"read {filename} of {repo_id}", repo_id, endpoint=endpoint, token=secret, revision=revision,
                max_retries=max_retries, retry_wait=retry_wait)

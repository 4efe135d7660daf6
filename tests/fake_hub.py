"""A small fake Hugging Face Hub, served over real HTTP on 127.0.0.1, for push / download tests.

It implements the part of the Hub API that ``huggingface_hub`` 2.x calls for ``create_repo``,
``upload_folder`` (preupload + commit; every file is declared "regular", so no LFS or Xet transfer ever
starts), ``repo_info`` / ``model_info``, ``list_repo_tree`` / ``list_repo_files``, ``get_paths_info``,
``whoami`` and file downloads (``HEAD`` / ``GET /{repo}/resolve/{revision}/{path}`` with ``ETag`` and
``X-Repo-Commit``), which is what ``snapshot_download``, ``hf_hub_download`` and
``AutoModelForCausalLM.from_pretrained(repo_id)`` need.

Storage is in memory: a repo is a list of commits, each a full ``{path: bytes}`` snapshot.
Errors look like the Hub's (``X-Error-Code`` / ``X-Error-Message`` headers), so ``huggingface_hub``
raises its usual exception classes. ``FakeHub.fail_next`` injects transient failures.

Use ``fake_hub_session(monkeypatch, tmp_path)`` (a context manager) or the ``fake_hub`` fixture: both
point ``huggingface_hub`` and ``transformers`` at the server for the duration of one test, turn offline
mode off for it only, and install an HTTP client that refuses every host but 127.0.0.1, so no test can
reach the internet.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

VALID_TOKEN = "hf_fake_write_token"
READ_ONLY_TOKEN = "hf_fake_read_token"
USER = "tester"


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # git object id, not security


@dataclass
class Commit:
    oid: str
    message: str
    files: dict[str, bytes]


@dataclass
class Repo:
    repo_id: str
    private: bool
    commits: list[Commit] = field(default_factory=list)

    @property
    def head(self) -> Commit:
        return self.commits[-1]

    def resolve(self, revision: str) -> Commit | None:
        if revision in ("main", "HEAD"):
            return self.head
        for c in self.commits:
            if c.oid == revision or (len(revision) >= 7 and c.oid.startswith(revision)):
                return c
        return None


@dataclass
class Fault:
    method: str
    path_pattern: re.Pattern
    status: int
    remaining: int


class _Reply(Exception):
    """Raised inside a handler: becomes an HTTP error response shaped like the Hub's."""

    def __init__(
        self, status: int, message: str, code: str | None = None,
        headers: dict[str, str] | None = None, body: dict[str, Any] | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers, self.body = headers or {}, body or {}


class FakeHub:
    """The in-memory Hub state plus the HTTP server that serves it."""

    def __init__(self, tokens: dict[str, tuple[str, bool]] | None = None):
        # token -> (user name, can write)
        self.tokens = tokens if tokens is not None else {VALID_TOKEN: (USER, True), READ_ONLY_TOKEN: (USER, False)}
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status) of every request served
        self.unhandled: list[str] = []  # "METHOD path" of requests no route matched
        self.faults: list[Fault] = []
        self._lock = threading.RLock()
        self._counter = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---------------------------------------------------------------------------------------- control
    @property
    def url(self) -> str:
        assert self._server is not None, "the fake hub is not running"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeHub:
        handler = type("Handler", (_Handler,), {"hub": self})
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), name="fake-hub", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def fail_next(self, method: str, path_regex: str, status: int = 503, times: int = 1) -> None:
        """Answer the next ``times`` requests matching ``method`` and ``path_regex`` with ``status``."""
        with self._lock:
            self.faults.append(Fault(method.upper(), re.compile(path_regex), status, times))

    def calls(self, method: str, path_regex: str) -> list[tuple[str, str, int]]:
        pattern = re.compile(path_regex)
        return [r for r in self.requests if r[0] == method.upper() and pattern.search(r[1])]

    def create(self, repo_id: str, files: dict[str, bytes] | None = None, private: bool = False) -> Repo:
        """Create a repo directly (test setup), with an initial commit holding ``files``."""
        with self._lock:
            repo = Repo(repo_id, private)
            repo.commits.append(Commit(self._new_oid(), "initial commit", {".gitattributes": b"", **(files or {})}))
            self.repos[repo_id] = repo
            return repo

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        commit = self.repos[repo_id].resolve(revision)
        assert commit is not None
        return dict(commit.files)

    def _new_oid(self) -> str:
        self._counter += 1
        return hashlib.sha1(f"fake-commit-{self._counter}-{time.time_ns()}".encode()).hexdigest()

    def _take_fault(self, method: str, path: str) -> int | None:
        with self._lock:
            for f in self.faults:
                if f.remaining > 0 and f.method == method and f.path_pattern.search(path):
                    f.remaining -= 1
                    return f.status
        return None


# -------------------------------------------------------------------------------------------------- routes
_REPO = r"(?P<repo>[^/]+/[^/]+)"
_KIND = r"(?P<kind>models|datasets|spaces)"
ROUTES: list[tuple[str, re.Pattern, str]] = [
    ("GET", re.compile(r"^/api/whoami-v2$"), "whoami"),
    ("POST", re.compile(r"^/api/repos/create$"), "create_repo"),
    ("DELETE", re.compile(r"^/api/repos/delete$"), "delete_repo"),
    ("POST", re.compile(r"^/api/validate-yaml$"), "validate_yaml"),
    ("GET", re.compile(rf"^/api/{_KIND}/{_REPO}(?:/revision/(?P<rev>[^/]+))?$"), "repo_info"),
    ("GET", re.compile(rf"^/api/{_KIND}/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?$"), "tree"),
    ("POST", re.compile(rf"^/api/{_KIND}/{_REPO}/paths-info/(?P<rev>[^/]+)$"), "paths_info"),
    ("POST", re.compile(rf"^/api/{_KIND}/{_REPO}/preupload/(?P<rev>[^/]+)$"), "preupload"),
    ("POST", re.compile(rf"^/api/{_KIND}/{_REPO}/commit/(?P<rev>[^/]+)$"), "commit"),
    ("HEAD", re.compile(rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"), "resolve"),
    ("GET", re.compile(rf"^/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)$"), "resolve"),
]


class _Handler(BaseHTTPRequestHandler):
    hub: FakeHub
    protocol_version = "HTTP/1.1"
    _request: tuple[str, str] = ("", "")

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet the default stderr log
        pass

    # --------------------------------------------------------------------------------- plumbing
    def do_GET(self) -> None:  # noqa: N802
        self._dispatch("GET")

    def do_HEAD(self) -> None:  # noqa: N802
        self._dispatch("HEAD")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def do_DELETE(self) -> None:  # noqa: N802
        self._dispatch("DELETE")

    def do_PUT(self) -> None:  # noqa: N802
        self._dispatch("PUT")

    def _body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _dispatch(self, method: str) -> None:
        split = urlsplit(self.path)
        path, query = unquote(split.path), parse_qs(split.query)
        self._request = (method, path)
        body = self._body()
        try:
            fault = self.hub._take_fault(method, path)
            if fault is not None:
                raise _Reply(fault, f"injected failure ({fault})")
            self._check_token()
            for route_method, pattern, name in ROUTES:
                match = pattern.match(path)
                if match and route_method == method:
                    getattr(self, f"_{name}")(match.groupdict(), query, body, method)
                    break
            else:
                self.hub.unhandled.append(f"{method} {path}")
                raise _Reply(404, f"fake hub: no route for {method} {path}")
        except _Reply as e:
            headers = dict(e.headers)
            if e.code:
                headers["X-Error-Code"] = e.code
            headers["X-Error-Message"] = e.message
            self._send(e.status, {"error": e.message, **e.body}, headers, head=method == "HEAD")
        except Exception as e:  # a bug in the fake: make it visible, not a hung client
            self._send(500, {"error": f"fake hub crashed: {e!r}"}, head=method == "HEAD")

    def _send(
        self, status: int, payload: Any = None, headers: dict[str, str] | None = None, head: bool = False,
        raw: bytes | None = None, content_type: str = "application/json",
    ) -> int:
        data = raw if raw is not None else (json.dumps(payload).encode() if payload is not None else b"")
        self.hub.requests.append((*self._request, status))  # logged before the client can see the answer
        self.send_response(status, HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "")
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(data)
        return status

    # --------------------------------------------------------------------------------- auth
    def _token(self) -> str | None:
        auth = self.headers.get("Authorization", "")
        return auth[7:].strip() if auth.lower().startswith("bearer ") else None

    def _check_token(self) -> None:
        token = self._token()
        if token is not None and token not in self.hub.tokens:
            raise _Reply(401, "Invalid credentials in Authorization header")

    def _user(self) -> tuple[str, bool] | None:
        token = self._token()
        return self.hub.tokens.get(token) if token else None

    def _require_write(self, namespace: str) -> str:
        user = self._user()
        if user is None:
            raise _Reply(401, "You must be authenticated to write to the Hub")
        name, can_write = user
        if not can_write:
            raise _Reply(403, "This token has read access only; a write token is needed")
        if namespace != name:
            raise _Reply(403, f"You don't have the rights to write to the namespace {namespace!r}")
        return name

    def _repo(self, params: dict[str, str], write: bool = False) -> Repo:
        repo_id = params["repo"]
        if params.get("kind", "models") != "models":
            raise _Reply(404, "fake hub: only model repos", "RepoNotFound")
        repo = self.hub.repos.get(repo_id)
        user = self._user()
        if repo is None or (repo.private and (user is None or user[0] != repo_id.split("/")[0])):
            raise _Reply(404, "Repository not found", "RepoNotFound")
        if write:
            self._require_write(repo_id.split("/")[0])
        return repo

    def _at_revision(self, repo: Repo, rev: str | None) -> Commit:
        commit = repo.resolve(unquote(rev or "main"))
        if commit is None:
            raise _Reply(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return commit

    # --------------------------------------------------------------------------------- endpoints
    def _whoami(self, params, query, body, method) -> int:
        user = self._user()
        if user is None:
            raise _Reply(401, "Unauthorized")
        role = "write" if user[1] else "read"
        return self._send(200, {"type": "user", "name": user[0], "orgs": [], "auth": {"accessToken": {"role": role}}})

    def _create_repo(self, params, query, body, method) -> int:
        payload = json.loads(body or b"{}")
        if payload.get("type", "model") != "model":
            raise _Reply(400, "fake hub: only model repos")
        user = self._user()
        namespace = payload.get("organization") or (user[0] if user else None)
        if namespace is None:
            raise _Reply(401, "You must be authenticated to create a repo")
        self._require_write(namespace)
        repo_id = f"{namespace}/{payload['name']}"
        url = f"{self.hub.url}/{repo_id}"
        with self.hub._lock:
            if repo_id in self.hub.repos:
                # the Hub answers an existing repo with 409 and still gives its url in the body
                raise _Reply(409, "You already created this model repo", body={"url": url})
            private = payload.get("visibility") == "private" or bool(payload.get("private"))
            self.hub.create(repo_id, private=private)
        return self._send(200, {"url": url, "name": repo_id, "id": repo_id})

    def _delete_repo(self, params, query, body, method) -> int:
        payload = json.loads(body or b"{}")
        repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
        self._require_write(repo_id.split("/")[0])
        if self.hub.repos.pop(repo_id, None) is None:
            raise _Reply(404, "Repository not found", "RepoNotFound")
        return self._send(200, {})

    def _validate_yaml(self, params, query, body, method) -> int:
        import yaml

        content = json.loads(body)["content"]
        match = re.match(r"^---\s*\n(.*?)\n---\s*\n", content, re.S)
        errors = []
        if match:
            try:
                meta = yaml.safe_load(match.group(1)) or {}
                if not isinstance(meta, dict):
                    errors.append({"message": "metadata must be a mapping"})
                elif "tags" in meta and not isinstance(meta["tags"], list):
                    errors.append({"message": '"tags" must be an array'})
            except yaml.YAMLError as e:
                errors.append({"message": f"invalid YAML: {e}"})
        if errors:
            return self._send(400, {"errors": errors, "warnings": []})
        return self._send(200, {"errors": [], "warnings": []})

    def _repo_info(self, params, query, body, method) -> int:
        repo = self._repo(params)
        commit = self._at_revision(repo, params.get("rev"))
        blobs = "blobs" in query
        siblings = []
        for path, data in sorted(commit.files.items()):
            entry: dict[str, Any] = {"rfilename": path}
            if blobs:
                entry.update(size=len(data), blobId=git_blob_sha1(data))
            siblings.append(entry)
        card = _card_data(commit.files.get("README.md", b""))
        info = {
            "id": repo.repo_id, "modelId": repo.repo_id, "author": repo.repo_id.split("/")[0], "sha": commit.oid,
            "private": repo.private, "gated": False, "disabled": False, "downloads": 0, "likes": 0,
            "tags": card.get("tags", []), "library_name": card.get("library_name"), "cardData": card or None,
            "siblings": siblings, "lastModified": "2026-01-01T00:00:00.000Z", "createdAt": "2026-01-01T00:00:00.000Z",
        }
        return self._send(200, info)

    def _tree(self, params, query, body, method) -> int:
        repo = self._repo(params)
        commit = self._at_revision(repo, params.get("rev"))
        prefix = (params.get("path") or "").strip("/")
        recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
        entries: dict[str, dict[str, Any]] = {}
        for path, data in sorted(commit.files.items()):
            if prefix and not path.startswith(prefix + "/"):
                continue
            rel = path[len(prefix) + 1 :] if prefix else path
            parts = rel.split("/")
            for depth in range(1, len(parts)):  # folders along the way
                folder = "/".join(([prefix] if prefix else []) + parts[:depth])
                if recursive or depth == 1:
                    entries.setdefault(folder, {"type": "directory", "oid": git_blob_sha1(folder.encode()), "path": folder})
            if recursive or len(parts) == 1:
                entries[path] = {"type": "file", "oid": git_blob_sha1(data), "size": len(data), "path": path}
        if prefix and not entries:
            raise _Reply(404, f"{prefix} does not exist on {commit.oid}", "EntryNotFound")
        return self._send(200, list(entries.values()))

    def _paths_info(self, params, query, body, method) -> int:
        repo = self._repo(params)
        commit = self._at_revision(repo, params.get("rev"))
        form = parse_qs(body.decode())
        out = []
        for path in form.get("paths", []):
            if path in commit.files:
                data = commit.files[path]
                out.append({"type": "file", "oid": git_blob_sha1(data), "size": len(data), "path": path})
            elif any(p.startswith(path.rstrip("/") + "/") for p in commit.files):
                out.append({"type": "directory", "oid": git_blob_sha1(path.encode()), "path": path})
        return self._send(200, out)

    def _preupload(self, params, query, body, method) -> int:
        repo = self._repo(params, write=True)
        commit = self._at_revision(repo, params.get("rev"))
        files = []
        for f in json.loads(body)["files"]:
            existing = commit.files.get(f["path"])
            files.append({
                "path": f["path"],
                "uploadMode": "regular",  # never LFS / Xet: content travels base64 in the commit payload
                "shouldIgnore": False,
                "oid": git_blob_sha1(existing) if existing is not None else None,
            })
        return self._send(200, {"files": files, "commitOid": commit.oid})

    def _commit(self, params, query, body, method) -> int:
        repo = self._repo(params, write=True)
        if query.get("create_pr"):
            raise _Reply(400, "fake hub: pull requests are not supported")
        rev = unquote(params["rev"])
        if rev != "main":
            raise _Reply(400, "fake hub: commits go to main only")
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        header = next((x["value"] for x in lines if x["key"] == "header"), None)
        if header is None or not header.get("summary"):
            raise _Reply(400, "commit header with a summary is required")
        with self.hub._lock:
            parent = repo.head
            if header.get("parentCommit") and not parent.oid.startswith(header["parentCommit"]):
                raise _Reply(412, "A commit has happened since. Please refresh and try again.")
            files = dict(parent.files)
            for item in lines:
                key, value = item["key"], item["value"]
                if key == "file":
                    if value.get("encoding", "base64") != "base64":
                        raise _Reply(400, "fake hub: base64 file content only")
                    files[value["path"]] = base64.b64decode(value["content"])
                elif key == "lfsFile":
                    raise _Reply(400, "fake hub: LFS files are not supported (preupload answers 'regular')")
                elif key == "deletedFile":
                    if files.pop(value["path"], None) is None:
                        raise _Reply(404, "A file with this name doesn't exist", "EntryNotFound")
                elif key == "deletedFolder":
                    folder = value["path"].rstrip("/") + "/"
                    files = {p: d for p, d in files.items() if not p.startswith(folder)}
                elif key != "header":
                    raise _Reply(400, f"fake hub: unsupported commit operation {key!r}")
            commit = Commit(self.hub._new_oid(), header["summary"], files)
            repo.commits.append(commit)
        url = f"{self.hub.url}/{repo.repo_id}/commit/{commit.oid}"
        return self._send(200, {"success": True, "commitOid": commit.oid, "commitUrl": url, "pullRequestUrl": None})

    def _resolve(self, params, query, body, method) -> int:
        repo = self._repo(params)
        commit = self._at_revision(repo, params.get("rev"))
        path = params["path"]
        data = commit.files.get(path)
        if data is None:
            raise _Reply(404, "Entry not found", "EntryNotFound", headers={"X-Repo-Commit": commit.oid})
        etag = git_blob_sha1(data)
        headers = {"ETag": f'"{etag}"', "X-Repo-Commit": commit.oid, "Accept-Ranges": "bytes"}
        status = 200
        range_header = self.headers.get("Range")
        if range_header and method == "GET":
            m = re.match(r"bytes=(\d+)-(\d*)$", range_header.strip())
            if m:
                start = int(m.group(1))
                end = int(m.group(2)) if m.group(2) else len(data) - 1
                headers["Content-Range"] = f"bytes {start}-{end}/{len(data)}"
                data, status = data[start : end + 1], 206
        return self._send(status, head=method == "HEAD", raw=data, headers=headers, content_type="application/octet-stream")


def _card_data(readme: bytes) -> dict[str, Any]:
    import yaml

    match = re.match(r"^---\s*\n(.*?)\n---\s*\n", readme.decode("utf-8", "replace"), re.S)
    if not match:
        return {}
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


# -------------------------------------------------------------------------------------------------- client
def _loopback_only(request: Any) -> None:
    host = request.url.host
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise RuntimeError(f"test tried to reach {request.url} (only the loopback fake hub is allowed)")


def _loopback_client_factory():
    import httpx2
    from huggingface_hub.utils._http import hf_request_event_hook

    return httpx2.Client(
        event_hooks={"request": [_loopback_only, hf_request_event_hook]},
        follow_redirects=True,
        timeout=30,
        trust_env=False,  # no proxies from the environment: loopback is direct
    )


@contextlib.contextmanager
def fake_hub_session(monkeypatch: pytest.MonkeyPatch, tmp_path, hub: FakeHub | None = None) -> Iterator[FakeHub]:
    """Start a fake hub and point ``huggingface_hub`` / ``transformers`` at it until the block ends.

    ``huggingface_hub`` reads ``HF_ENDPOINT`` and ``HF_HUB_OFFLINE`` once, at import time, into
    ``huggingface_hub.constants``; the module-level ``huggingface_hub.api`` and transformers' cached
    ``HfApi`` keep the endpoint they were built with. So the constants and those two objects are patched
    (``monkeypatch`` undoes it all), and the cache and token file live under ``tmp_path``.
    """
    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub.utils import _http

    hub = (hub or FakeHub()).start()
    url = hub.url
    cache = tmp_path / "hf-cache"
    try:
        monkeypatch.setenv("HF_ENDPOINT", url)
        monkeypatch.setenv("HF_HUB_OFFLINE", "0")
        monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
        for var in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "TRANSFORMERS_OFFLINE"):
            monkeypatch.delenv(var, raising=False)
        monkeypatch.setattr(constants, "ENDPOINT", url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(constants, "HF_URL_HOSTS", constants.HF_URL_HOSTS | {"127.0.0.1"})
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
        monkeypatch.setattr(constants, "HUGGINGFACE_HUB_CACHE", str(cache))
        monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))
        monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "hf-home" / "stored_tokens"))
        monkeypatch.setattr(huggingface_hub.hf_api.api, "endpoint", url)
        try:
            import transformers.utils.hub as tf_hub

            monkeypatch.setattr(tf_hub, "_hf_api", None)
        except ImportError:
            pass
        monkeypatch.setattr(_http, "_GLOBAL_CLIENT_FACTORY", _loopback_client_factory)
        _http.close_session()
        yield hub
    finally:
        _http.close_session()  # the next get_session() builds a client with the restored factory
        hub.stop()


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch, tmp_path) -> Iterator[FakeHub]:
    """A running fake hub that ``huggingface_hub`` and ``transformers`` talk to during this test."""
    with fake_hub_session(monkeypatch, tmp_path) as hub:
        yield hub

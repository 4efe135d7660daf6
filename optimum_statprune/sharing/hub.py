"""Push a pruned model to the Hugging Face Hub, checked first and with its model card.

``push_to_hub(folder, repo_id)`` verifies the folder against its manifest, writes the model card
(``card.py``) as ``README.md``, creates the repo if needed and uploads the folder with
``HfApi.upload_folder``. The transport (tokens, retries, one-line ``HubError`` messages, downloads)
is ``transport.py``; the names below are re-exported so ``sharing.hub`` stays the one import for
sharing a model.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

from .card import CARD_MARKER, layer_type, model_card, sparsity_by_type, write_model_card
from .transport import HubError, call, download, is_hub_id, looks_like_hub_id, redact, resolve_token
from .verify import load_manifest, verify

logger = logging.getLogger(__name__)

# Weight files of the repo that a push replaces: stale shards of an earlier, differently sharded push go.
WEIGHT_PATTERNS = ["*.safetensors", "*.safetensors.index.json", "*.bin", "*.bin.index.json"]
IGNORE_PATTERNS = [".tmp-*", "**/.tmp-*", "*.incomplete", ".cache/**"]

__all__ = [
    "CARD_MARKER", "HubError", "download", "is_hub_id", "layer_type", "looks_like_hub_id", "model_card",
    "push_to_hub", "sparsity_by_type", "write_model_card",
]


def push_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    private: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
    endpoint: str | None = None,
    *,
    revision: str | None = None,
    base_model: str | None = None,
    check: bool = True,
    token_file: str | os.PathLike | None = None,
    max_retries: int = 3,
    retry_wait: float = 1.0,
) -> Any:
    """Upload a pruned model saved by ``StatPruner.save_pretrained`` to ``repo_id``; return the
    ``huggingface_hub.CommitInfo`` (a ``str``, the commit URL, with ``.oid`` and ``.commit_url``).

    The repo is created if missing (``private`` applies only then; otherwise the namespace's default
    visibility). ``README.md`` is written or refreshed from the manifest first. Weight files in the repo
    that this push does not bring (stale shards of an earlier push) are deleted in the same commit. With
    ``check`` (default) the folder is verified against its manifest before anything is sent. Unchanged
    files are not uploaded again. The token: ``token``, else ``token_file``, else ``HF_TOKEN`` / the
    stored login.
    """
    from huggingface_hub import HfApi

    folder = Path(folder)
    if not is_hub_id(repo_id):
        raise HubError(f"{repo_id!r} is not a Hub repository id; give one such as namespace/name")
    if not folder.is_dir():
        raise HubError(f"{folder} is not a directory: save the pruned model with StatPruner.save_pretrained first")
    try:
        manifest = load_manifest(folder)
    except (FileNotFoundError, ValueError) as e:
        raise HubError(f"{e}; push only folders written by StatPruner.save_pretrained") from e
    if not any(folder.glob("*.safetensors")):
        raise HubError(f"{folder} holds no *.safetensors weights; save the pruned model again")
    secret = resolve_token(token, token_file)
    if check:
        report = verify(folder)
        if not report.ok:
            raise HubError(
                f"{folder} does not match its manifest ({report.summary()}); not pushing it "
                "(print(optimum_statprune.sharing.verify.verify(folder)) lists the problems)"
            )
    write_model_card(folder, base_model, repo_id)
    api = HfApi(endpoint=endpoint, token=secret)
    pattern = (manifest.get("config") or {}).get("pattern", "?")
    message = commit_message or f"Upload {pattern} pruned model with optimum-statprune"
    retries = {"endpoint": api.endpoint, "token": secret, "max_retries": max_retries, "retry_wait": retry_wait}

    def create() -> Any:
        # private=False leaves the namespace's default visibility (an organization may default to private)
        return api.create_repo(repo_id, private=True if private else None, exist_ok=True, repo_type="model")

    def upload() -> Any:
        return api.upload_folder(
            repo_id=repo_id, folder_path=folder, commit_message=message, revision=revision,
            ignore_patterns=list(IGNORE_PATTERNS), delete_patterns=list(WEIGHT_PATTERNS),
        )

    call(create, f"create {repo_id}", repo_id, **retries)
    info = call(upload, f"upload {folder} to {repo_id}", repo_id, revision=revision, **retries)
    logger.info("pushed %s to %s: %s", folder, repo_id, redact(getattr(info, "commit_url", info), [secret]))
    return info

"""Check a saved pruned model against its manifest, without loading the model.

``verify(dir_or_repo_id)`` reads the safetensors files one tensor at a time (``safe_open``; never a
pickle, never the whole model) and checks, for every layer of ``pruning_manifest.json``:

- the tensor exists with the recorded shape;
- its sha256 (``manifest.tensor_sha256`` of the ``[d_out, d_in]`` weight, or of the tensor as stored) matches;
- it has at least as many exact zeros as the recorded sparsity says (fewer = pruned weights revived);
- under an N:M pattern, no group of M consecutive inputs holds more than N nonzeros.

With ``hashes=False`` only the sparsity checks run: that is how a fine-tuned copy of a pruned model is
checked against the original manifest (``verify(finetuned_dir, manifest=original, hashes=False)``).

Where a layer lives on disk: the manifest names the in-memory state-dict key. GPT-2 style ``Conv1D``
weights are stored transposed, and transformers 5 saves fused MoE experts back in the checkpoint's
per-expert layout (``experts.{e}.w1.weight`` ...). Orientation comes from the record (``transposed``)
when present, else from the model class built on the meta device from ``config.json`` (no weights),
else from the shape; fused experts are found through transformers' checkpoint conversion mapping.
"""

from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..checkpoint.shards import tensor_sha256
from .manifest import MANIFEST_NAME, MANIFEST_SCHEMA_VERSION, read_manifest

logger = logging.getLogger(__name__)

WEIGHT_FILES = ["*.safetensors", "*.safetensors.index.json", "config.json", MANIFEST_NAME]


@dataclass
class Mismatch:
    """One problem found: ``kind`` is ``missing``, ``shape``, ``sha256``, ``sparsity``, ``n:m`` or
    ``unverifiable``."""

    layer: str
    kind: str
    detail: str
    tensor: str | None = None

    def __str__(self) -> str:
        return f"{self.layer}: {self.kind}: {self.detail}"


@dataclass
class VerificationReport:
    """What ``verify`` found. ``ok`` is True when every manifest layer was checked and matched."""

    source: str
    layers: int = 0
    checked: int = 0
    hashes: bool = True
    mismatches: list[Mismatch] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.mismatches and self.checked == self.layers

    def by_kind(self, kind: str) -> list[Mismatch]:
        return [m for m in self.mismatches if m.kind == kind]

    def summary(self) -> str:
        if self.ok:
            what = "hashes and sparsity" if self.hashes else "sparsity"
            return f"OK: {self.checked}/{self.layers} layers match the manifest ({what})"
        kinds: dict[str, int] = {}
        for m in self.mismatches:
            kinds[m.kind] = kinds.get(m.kind, 0) + 1
        found = ", ".join(f"{n} {k}" for k, n in kinds.items())
        return f"FAILED: {len(self.mismatches)} problem(s) in {self.layers} layers ({found})"

    def __str__(self) -> str:
        lines = [f"{self.source}: {self.summary()}"]
        lines += [f"  - {m}" for m in self.mismatches[:50]]
        if len(self.mismatches) > 50:
            lines.append(f"  ... and {len(self.mismatches) - 50} more")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)

    def raise_if_failed(self) -> None:
        if not self.ok:
            raise ValueError(str(self))


# ------------------------------------------------------------------------------------------- manifest
def load_manifest(
    dir_or_repo_id: str | os.PathLike,
    revision: str | None = None,
    token: str | None = None,
    *,
    endpoint: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """The pruning manifest of a local directory, a manifest file, or a Hub repo (only the manifest
    file is downloaded). Hub failures raise ``hub.HubError``."""
    path = Path(dir_or_repo_id)
    if path.is_dir():
        return read_manifest(path)
    if path.is_file():
        return _check_schema(json.loads(path.read_text(encoding="utf-8")), str(path))
    from huggingface_hub import hf_hub_download

    from .hub import _call, _default_endpoint

    repo_id = str(dir_or_repo_id)

    def fetch() -> str:
        return hf_hub_download(
            repo_id, MANIFEST_NAME, revision=revision, token=token, endpoint=endpoint, cache_dir=cache_dir
        )

    local = _call(fetch, f"read {MANIFEST_NAME} of {repo_id}", repo_id, endpoint or _default_endpoint(), 2, 1.0, revision)
    with open(local, encoding="utf-8") as f:
        return _check_schema(json.load(f), f"{repo_id}/{MANIFEST_NAME}")


def _check_schema(manifest: dict[str, Any], where: str) -> dict[str, Any]:
    if manifest.get("schema_version") != MANIFEST_SCHEMA_VERSION:
        raise ValueError(
            f"{where} has manifest schema {manifest.get('schema_version')!r}; this version reads {MANIFEST_SCHEMA_VERSION}"
        )
    return manifest


# ------------------------------------------------------------------------------------------- verify
def verify(
    dir_or_repo_id: str | os.PathLike,
    revision: str | None = None,
    token: str | None = None,
    *,
    manifest: dict[str, Any] | str | os.PathLike | None = None,
    hashes: bool = True,
    endpoint: str | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> VerificationReport:
    """Check the weights of a local directory or Hub repo against a pruning manifest (its own unless
    ``manifest`` is given: a dict, a file or a directory). See the module docstring for the checks."""
    folder = Path(dir_or_repo_id)
    if not folder.is_dir():
        from .hub import download

        folder = Path(download(str(dir_or_repo_id), revision, token, cache_dir, endpoint, allow_patterns=WEIGHT_FILES))
    if manifest is None:
        man = read_manifest(folder)
    elif isinstance(manifest, dict):
        man = manifest
    else:
        man = load_manifest(manifest)
    report = VerificationReport(str(dir_or_repo_id), layers=len(man.get("layers", [])), hashes=hashes)
    checkpoint = _Checkpoint(folder)
    if not checkpoint.files:
        report.mismatches.append(Mismatch("*", "missing", f"no *.safetensors files in {folder}"))
        return report
    layouts = _Layouts(folder)
    default_pattern = (man.get("config") or {}).get("pattern", "unstructured")
    try:
        for rec in man.get("layers", []):
            _check_layer(rec, checkpoint, layouts, default_pattern, hashes, report)
    finally:
        checkpoint.close()
    report.notes += layouts.notes
    if report.ok:
        logger.info("%s", report.summary())
    else:
        logger.warning("%s", report)
    return report


def _check_layer(
    rec: dict[str, Any], checkpoint: _Checkpoint, layouts: _Layouts, default_pattern: str, hashes: bool,
    report: VerificationReport,
) -> None:
    name, key = rec["name"], rec.get("tensor")
    shape = [int(s) for s in rec["shape"]]

    def fail(kind: str, detail: str) -> None:
        report.mismatches.append(Mismatch(name, kind, detail, key))

    if not key:
        fail("unverifiable", "the manifest names no state-dict tensor for this layer")
        return
    expert = rec.get("expert")
    if expert is None:  # a fused expert tensor's slice: "<module>.experts.<e>.<param>" -> "<module>.experts.<param>"
        index = _expert_index(name)
        if index is not None and key == f"{name.rsplit('.', 2)[0]}.{name.rsplit('.', 1)[1]}":
            expert = index
    try:
        stored = checkpoint.weight(key, expert, layouts)
    except KeyError as e:
        fail("missing", str(e.args[0]))
        return
    candidates = layouts.orientations(rec, stored, shape, expert)
    if not candidates:
        fail("shape", f"stored {list(stored.shape)}, manifest {shape}")
        return
    weight = candidates[0]
    if hashes and rec.get("sha256"):
        # The hash may be of the [d_out, d_in] weight or of the tensor as stored (they differ for Conv1D).
        digests: dict[str, torch.Tensor] = {}
        for w in (*candidates, stored):
            digests.setdefault(tensor_sha256(w), w)
        matched = digests.get(rec["sha256"])
        if matched is None:
            fail("sha256", f"stored tensor hashes to {next(iter(digests))[:16]}..., manifest {rec['sha256'][:16]}...")
        elif any(matched is c for c in candidates):
            weight = matched
    elif hashes:
        report.notes.append(f"{name}: no sha256 in the manifest; sparsity checked only")
    numel = weight.numel()
    zeros = int((weight == 0).sum())
    expected = round(float(rec["sparsity"]) * numel)
    if zeros < expected:
        fail("sparsity", f"{zeros}/{numel} zeros ({zeros / numel:.4%}), manifest {expected} ({rec['sparsity']:.4%}): "
                         f"at least {expected - zeros} pruned weight(s) are nonzero again")
    elif zeros > expected:
        report.notes.append(f"{name}: {zeros - expected} more zero(s) than the manifest records")
    pattern = str(rec.get("pattern") or default_pattern)
    match = re.fullmatch(r"(\d+):(\d+)", pattern)
    if match:
        n, m = int(match.group(1)), int(match.group(2))
        if weight.shape[1] % m:
            fail("n:m", f"{pattern} needs the input width ({weight.shape[1]}) to be a multiple of {m}")
        else:
            nonzero = (weight != 0).reshape(weight.shape[0], -1, m).sum(-1)
            bad = int((nonzero > n).sum())
            if bad:
                fail("n:m", f"{bad} group(s) of {m} inputs hold more than {n} nonzeros (at most {int(nonzero.max())})")
    report.checked += 1


def _expert_index(name: str) -> int | None:
    """``...experts.5.down_proj`` -> 5 (the manifest's names for fused expert slices)."""
    parts = name.split(".")
    if len(parts) >= 3 and parts[-3] == "experts" and parts[-2].isdigit():
        return int(parts[-2])
    return None


# ------------------------------------------------------------------------------------------- reading
class _Checkpoint:
    """The safetensors files of a folder: key -> file from the index (or the headers), and at most one
    file open at a time."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        self._safe_open = safe_open
        self.folder = folder
        self.where: dict[str, str] = {}
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            with open(index, encoding="utf-8") as f:
                self.where = dict(json.load(f)["weight_map"])
            self.files = sorted(set(self.where.values()))
        else:
            self.files = sorted(p.name for p in folder.glob("*.safetensors"))
            for fname in self.files:
                with safe_open(folder / fname, framework="pt") as h:
                    for k in h.keys():  # noqa: SIM118 - safe_open is not a mapping
                        self.where.setdefault(k, fname)
        self._open_name: str | None = None
        self._handle: Any = None

    def close(self) -> None:
        if self._handle is not None:
            self._handle.__exit__(None, None, None)
        self._handle = self._open_name = None

    def _file(self, key: str):
        fname = self.where[key]
        if fname != self._open_name:
            self.close()
            path = self.folder / fname
            if not path.is_file():
                raise KeyError(f"{key} is listed in {fname}, which is missing")
            self._handle = self._safe_open(path, framework="pt").__enter__()
            self._open_name = fname
        return self._handle

    def get(self, key: str, index: int | None = None) -> torch.Tensor:
        handle = self._file(key)
        return handle.get_slice(key)[index] if index is not None else handle.get_tensor(key)

    def weight(self, key: str, expert: int | None, layouts: _Layouts) -> torch.Tensor:
        """The stored tensor of a layer (one expert's slice for fused experts), in its on-disk layout."""
        if key in self.where:
            return self.get(key, expert if expert is not None and expert >= 0 else None)
        if expert is not None:
            sources = layouts.expert_sources(key, expert, self.where)
            if sources:
                return torch.cat([self.get(k) for k in sources], dim=0)
        raise KeyError(f"{key} is not in the checkpoint")


class _Layouts:
    """How the in-memory ``[d_out, d_in]`` weight maps to what is on disk, per layer."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.notes: list[str] = []
        self._skeleton: Any = None
        self._skeleton_tried = False
        config_path = folder / "config.json"
        self.config: dict[str, Any] = {}
        if config_path.is_file():
            with open(config_path, encoding="utf-8") as f:
                self.config = json.load(f)

    def skeleton(self):
        """The model built on the meta device from ``config.json`` (no weights, no remote code), or None."""
        if not self._skeleton_tried:
            self._skeleton_tried = True
            try:
                from transformers import AutoConfig, AutoModelForCausalLM

                config = AutoConfig.from_pretrained(self.folder, trust_remote_code=False)
                with torch.device("meta"):
                    self._skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
            except Exception as e:  # noqa: BLE001 - fall back to shapes
                self.notes.append(f"could not build the model class from config.json ({e!r}); orientation from shapes")
        return self._skeleton

    def transposed(self, rec: dict[str, Any], expert: int | None) -> bool | None:
        """True for GPT-2 ``Conv1D`` and transposed fused experts; None when unknown."""
        if "transposed" in rec:
            return bool(rec["transposed"])
        model = self.skeleton()
        if model is None:
            return None
        name = rec["name"]
        module_name = name.rsplit(".", 2)[0] if expert is not None else name
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            return None
        if expert is not None:
            return bool(getattr(module, "is_transposed", False))
        from transformers.pytorch_utils import Conv1D

        return isinstance(module, Conv1D)

    def orientations(
        self, rec: dict[str, Any], stored: torch.Tensor, shape: list[int], expert: int | None
    ) -> list[torch.Tensor]:
        """Candidate ``[d_out, d_in]`` views of ``stored``: one when the layout is known, both for a
        square weight of unknown layout."""
        if stored.dim() != 2:
            return []
        flipped = stored.T
        known = self.transposed(rec, expert)
        if known is not None:
            w = flipped if known else stored
            return [w] if list(w.shape) == shape else []
        out = [w for w in (stored, flipped) if list(w.shape) == shape]
        if len(out) == 2:
            self.notes.append(f"{rec['name']}: square weight of unknown layout; both orientations tried")
        return out

    def expert_sources(self, key: str, expert: int, available: dict[str, str]) -> list[str] | None:
        """On-disk keys whose rows, concatenated, form expert ``expert`` of the fused tensor ``key``
        (transformers' ``MergeModulelist`` [+ ``Concatenate(dim=1)``] conversion, reversed)."""
        model_type = self.config.get("model_type")
        if not model_type:
            return None
        try:
            from transformers.conversion_mapping import get_checkpoint_conversion_mapping

            mapping = get_checkpoint_conversion_mapping(model_type) or []
        except Exception:  # noqa: BLE001 - older transformers: no mapping, nothing to reverse
            return None
        renamings = [(s, t) for c in mapping if type(c).__name__ == "WeightRenaming"
                     for s, t in zip(c.source_patterns, c.target_patterns, strict=False)]
        for conv in mapping:
            if type(conv).__name__ != "WeightConverter":
                continue
            ops = [type(o).__name__ for o in getattr(conv, "operations", [])]
            if ops not in (["MergeModulelist"], ["MergeModulelist", "Concatenate"]):
                continue
            for target in conv.target_patterns:
                at = key.rfind(target.lstrip("^").rstrip("$"))
                if at < 0 or not key.endswith(target.rstrip("$")):
                    continue
                prefix = key[:at]
                keys = [prefix + s.replace("*", str(expert)) for s in conv.source_patterns]
                for candidate in _renamed(keys, renamings):
                    if all(k in available for k in candidate):
                        return candidate
        return None


def _renamed(keys: list[str], renamings: list[tuple[str, str]]) -> list[list[str]]:
    """``keys`` as they are, and with each in-memory -> checkpoint renaming undone."""
    out = [keys]
    for source, target in renamings:
        undone = [k.replace(target, source) for k in keys]
        if undone != keys:
            out.append(undone)
    return out

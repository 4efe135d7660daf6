"""Check a saved pruned model against its manifest, without loading the model.

``verify(dir_or_repo_id)`` reads the safetensors files through ``checkpoint.shards`` (headers, then
tensors into host memory a bounded batch at a time; never a pickle, never the whole model).

With a schema-2 manifest (top-level ``"files"`` and ``"tensors"``) every file and every tensor is covered:

- every file the index names (or ``model.safetensors``) exists (``missing-file``), and no other
  ``*.safetensors`` file lies in the folder (``unexpected-file``); with ``hashes``, the
  files are the ones the manifest records (``missing-file``, ``unexpected-file``) with the recorded
  sizes (``size``);
- every tensor stored in those files is in the manifest (``unexpected-tensor``), sits where the index
  says (``index``) and, with ``hashes``, its stored bytes hash to the recorded ``tensor_sha256``
  (``sha256``); every manifest tensor is stored somewhere (``missing-tensor``).

For every pruned layer, with either schema:

- the tensor exists (``missing-tensor``) with the recorded shape (``shape``);
- with ``hashes``, its sha256 matches the layer record (of the ``[d_out, d_in]`` weight or as stored);
- it has at least as many exact zeros as the recorded sparsity says (``sparsity``: pruned weights revived);
- under an N:M pattern, no group of M consecutive inputs holds more than N nonzeros (``n:m``).

A schema-1 manifest covers only the pruned layers; the report warns that the other tensors (embeddings,
norms, ``lm_head``) and the file sizes were not checked. ``hashes=False`` skips every hash and the
manifest's file list and sizes: that is how a fine-tuned copy (new values, perhaps other shards) is
checked against the original manifest (``verify(finetuned_dir, manifest=original, hashes=False)``);
the folder's own files, the set of tensor names, sparsity and N:M are still checked.

Where a layer lives on disk: the manifest names the in-memory state-dict key. Checkpoints that
transformers converts on load (per-expert MoE tensors fused in memory) are read block by block through
``engine.conversion.CheckpointConversion``, as streaming reads them. GPT-2 style ``Conv1D`` weights are
stored transposed: the orientation comes from the record (``transposed``), else from the model class
built on the meta device from ``config.json``, else from the shape.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..checkpoint.shards import (
    INDEX_NAME,
    CheckpointReader,
    read_to_host,
    safetensors_header,
    sha256_in_place,
    tensor_sha256,
)
from ..tensor_math.patterns import PatternError, parse_pattern
from . import transport
from .manifest import MANIFEST_NAME, READABLE_SCHEMA_VERSIONS

logger = logging.getLogger(__name__)

WEIGHT_FILES = ["*.safetensors", "*.safetensors.index.json", "config.json", MANIFEST_NAME]
HASH_BATCH_BYTES = 256 * 2**20  # host memory one hashing read may take (a larger tensor is read alone)


@dataclass
class Mismatch:
    """One problem found. ``layer`` is the layer, tensor key or file it concerns; ``kind`` is one of
    ``missing-file``, ``unexpected-file``, ``size``, ``missing-tensor``, ``unexpected-tensor``,
    ``index``, ``unreadable``, ``shape``, ``sha256``, ``sparsity``, ``n:m``, ``unverifiable``."""

    layer: str
    kind: str
    detail: str
    tensor: str | None = None

    def __str__(self) -> str:
        return f"{self.layer}: {self.kind}: {self.detail}"


@dataclass
class VerificationReport:
    """What ``verify`` found. ``ok`` is True when every manifest layer was checked and nothing differed."""

    source: str
    layers: int = 0
    checked: int = 0
    hashes: bool = True
    schema: int = 1
    tensors: int = 0  # tensors checked against the manifest's "tensors" (schema 2)
    files: int = 0  # files checked against the manifest's "files" (schema 2)
    mismatches: list[Mismatch] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.mismatches and self.checked == self.layers

    def by_kind(self, kind: str) -> list[Mismatch]:
        return [m for m in self.mismatches if m.kind == kind]

    def summary(self) -> str:
        if self.ok:
            what = "hashes and sparsity" if self.hashes else "sparsity"
            if self.schema >= 2:
                return f"OK: {self.checked}/{self.layers} layers, {self.tensors} tensors in {self.files} file(s) match the manifest ({what})"
            return (f"OK: {self.checked}/{self.layers} layers match the manifest ({what}; schema-1 manifest: "
                    "tensors outside the pruned layers not checked)")
        kinds: dict[str, int] = {}
        for m in self.mismatches:
            kinds[m.kind] = kinds.get(m.kind, 0) + 1
        found = ", ".join(f"{n} {k}" for k, n in kinds.items()) or f"{self.layers - self.checked} layer(s) unchecked"
        return f"FAILED: {len(self.mismatches)} problem(s) in {self.layers} layers ({found})"

    def __str__(self) -> str:
        lines = [f"{self.source}: {self.summary()}"]
        lines += [f"  - {m}" for m in self.mismatches[:50]]
        if len(self.mismatches) > 50:
            lines.append(f"  ... and {len(self.mismatches) - 50} more")
        lines += [f"  warning: {w}" for w in self.warnings]
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
    token_file: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """The pruning manifest (schema 1 or 2) of a local directory, a manifest file, or a Hub repo (only
    the manifest file is downloaded). Hub failures raise ``transport.HubError``."""
    path = Path(dir_or_repo_id)
    if path.is_dir():
        path = path / MANIFEST_NAME
        if not path.is_file():
            raise FileNotFoundError(f"no {MANIFEST_NAME} in {dir_or_repo_id}: not a model pruned by optimum-statprune")
        where = str(path)
    elif path.is_file():
        where = str(path)
    else:
        repo_id = str(dir_or_repo_id)
        path = Path(transport.download_file(repo_id, MANIFEST_NAME, revision, token, endpoint=endpoint,
                                            cache_dir=cache_dir, token_file=token_file))
        where = f"{repo_id}/{MANIFEST_NAME}"
    with open(path, encoding="utf-8") as f:
        return check_schema(json.load(f), where)


def check_schema(manifest: dict[str, Any], where: str) -> dict[str, Any]:
    """``manifest`` if this version reads its schema; a ``ValueError`` naming ``where`` otherwise."""
    version = manifest.get("schema_version") if isinstance(manifest, dict) else None
    if version not in READABLE_SCHEMA_VERSIONS:
        raise ValueError(f"{where} has manifest schema {version!r}; this version reads {', '.join(map(str, READABLE_SCHEMA_VERSIONS))}")
    if version >= 2 and not (isinstance(manifest.get("tensors"), dict) and isinstance(manifest.get("files"), dict)):
        raise ValueError(f"{where} is a schema-{version} manifest without its 'tensors' and 'files' sections")
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
    token_file: str | os.PathLike | None = None,
) -> VerificationReport:
    """Check the weights of a local directory or Hub repo against a pruning manifest (its own unless
    ``manifest`` is given: a dict, a file or a directory). See the module docstring for the checks."""
    folder = Path(dir_or_repo_id)
    if not folder.is_dir():
        folder = Path(transport.download(str(dir_or_repo_id), revision, token, cache_dir, endpoint,
                                         allow_patterns=WEIGHT_FILES, token_file=token_file))
    if manifest is None:
        man = load_manifest(folder)
    elif isinstance(manifest, dict):
        man = check_schema(manifest, "the manifest given")
    else:
        man = load_manifest(manifest)
    report = VerificationReport(str(dir_or_repo_id), layers=len(man.get("layers", [])), hashes=hashes,
                                schema=int(man["schema_version"]))
    try:
        reader = CheckpointReader(folder)
    except FileNotFoundError as e:
        report.mismatches.append(Mismatch("*", "missing-file", str(e)))
        return report
    except Exception as e:  # noqa: BLE001 - a checkpoint that cannot be opened fails verification, with the reason
        report.mismatches.append(Mismatch("*", "unreadable", f"{type(e).__name__}: {e}"))
        return report
    named = sorted(set(reader.weight_map.values()))
    present = [name for name in named if (folder / name).is_file()]
    for name in sorted(set(named) - set(present)):
        keys = [k for k, f in reader.weight_map.items() if f == name]
        report.mismatches.append(Mismatch(name, "missing-file", f"named by {INDEX_NAME} for {len(keys)} tensor(s) "
                                                                f"(e.g. {keys[0]}), not on disk"))
    if report.schema >= 2:
        for stray in sorted({p.name for p in folder.glob("*.safetensors")} - set(named)):
            report.mismatches.append(Mismatch(stray, "unexpected-file", "a safetensors file the checkpoint does not "
                                                                        "name (a stale shard?); it would be pushed too"))
        if hashes:  # a fine-tuned copy may be sharded differently: its file list is its own
            _check_files(man["files"], folder, named, present, report)
        _check_tensors(man["tensors"], folder, reader.weight_map, present, hashes, report)
    else:
        report.warnings.append(
            "schema-1 manifest: only the pruned layers are checked; tensors outside them (embeddings, norms, "
            "lm_head, ...) and the file sizes are not covered"
        )
        logger.info("%s: %s", report.source, report.warnings[-1])
    _check_layers(man, folder, reader, hashes, report)
    if report.ok:
        logger.info("%s", report.summary())
    else:
        logger.warning("%s", report)
    return report


def _check_files(recorded: dict[str, int], folder: Path, named: list[str], present: list[str],
                 report: VerificationReport) -> None:
    for name in named:
        if name not in recorded:
            report.mismatches.append(Mismatch(name, "unexpected-file", "named by the checkpoint, not recorded in the manifest"))
    for name, size in recorded.items():
        if name not in named:
            report.mismatches.append(Mismatch(name, "missing-file", "recorded in the manifest, not part of the checkpoint"))
        elif name in present:
            report.files += 1
            actual = (folder / name).stat().st_size
            if actual != int(size):
                report.mismatches.append(Mismatch(name, "size", f"{actual} bytes on disk, manifest {size}"))


def _check_tensors(recorded: dict[str, str], folder: Path, weight_map: dict[str, str], present: list[str],
                   hashes: bool, report: VerificationReport) -> None:
    """Every stored tensor against the manifest's ``tensors``, hashed from its stored bytes."""
    seen: set[str] = set()
    for name in present:
        path = folder / name
        try:
            _, header = safetensors_header(path)
        except (OSError, ValueError) as e:
            report.mismatches.append(Mismatch(name, "unreadable", f"safetensors header: {e}"))
            continue
        keys = []
        for key in header:
            seen.add(key)
            if key not in recorded:
                report.mismatches.append(Mismatch(key, "unexpected-tensor", f"stored in {name}, not in the manifest", key))
                continue
            if weight_map.get(key) != name:
                report.mismatches.append(Mismatch(key, "index", f"stored in {name}, the index names {weight_map.get(key)}", key))
            keys.append(key)
            report.tensors += 1
        if not hashes:
            continue
        try:
            for key, digest in _stored_digests(path, header, keys):
                if digest != recorded[key]:
                    report.mismatches.append(Mismatch(
                        key, "sha256", f"stored bytes hash to {digest[:16]}..., manifest {str(recorded[key])[:16]}...", key))
        except (OSError, EOFError, KeyError, RuntimeError) as e:
            report.mismatches.append(Mismatch(name, "unreadable", f"reading its tensors failed: {e!r}"))
    for key in sorted(set(recorded) - seen):
        where = weight_map.get(key)
        report.mismatches.append(Mismatch(key, "missing-tensor", "recorded in the manifest, stored in no file"
                                                                 + (f" (the index names {where})" if where else ""), key))


def _stored_digests(path: Path, header: dict[str, Any], keys: list[str]) -> Iterator[tuple[str, str]]:
    """``(key, tensor_sha256)`` of ``keys`` in ``path``, read in file order, ``HASH_BATCH_BYTES`` at a time."""
    ordered = sorted(keys, key=lambda k: header[k]["data_offsets"][0])
    batch: list[str] = []
    size = 0
    for key in [*ordered, None]:
        nbytes = 0 if key is None else header[key]["data_offsets"][1] - header[key]["data_offsets"][0]
        if batch and (key is None or size + nbytes > HASH_BATCH_BYTES):
            tensors, _ = read_to_host({path: batch})
            for k in batch:
                yield k, sha256_in_place(tensors[k])
            del tensors
            batch, size = [], 0
        if key is not None:
            batch.append(key)
            size += nbytes


# ------------------------------------------------------------------------------------------- layers
def _check_layers(man: dict[str, Any], folder: Path, reader: CheckpointReader, hashes: bool,
                  report: VerificationReport) -> None:
    model = _ModelLayout(folder, reader)
    default_pattern = (man.get("config") or {}).get("pattern", "unstructured")
    for rec in man.get("layers", []):
        _check_layer(rec, model, default_pattern, hashes, report)
    report.notes += model.notes


def _check_layer(rec: dict[str, Any], model: _ModelLayout, default_pattern: str, hashes: bool,
                 report: VerificationReport) -> None:
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
        stored = model.weight(key, expert)
    except KeyError as e:
        fail("missing-tensor", str(e.args[0]))
        return
    except (OSError, EOFError, ValueError, RuntimeError) as e:  # a truncated or damaged shard
        fail("unreadable", f"{type(e).__name__}: {e}")
        return
    candidates = model.orientations(rec, stored, shape, expert)
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
    _check_sparsity(rec, weight, str(rec.get("pattern") or default_pattern), fail, report)
    report.checked += 1


def _check_sparsity(rec: dict[str, Any], weight: torch.Tensor, pattern: str, fail, report: VerificationReport) -> None:
    numel = weight.numel()
    zeros = int((weight == 0).sum())
    expected = round(float(rec["sparsity"]) * numel)
    if zeros < expected:
        fail("sparsity", f"{zeros}/{numel} zeros ({zeros / numel:.4%}), manifest {expected} ({rec['sparsity']:.4%}): "
                         f"at least {expected - zeros} pruned weight(s) are nonzero again")
    elif zeros > expected:
        report.notes.append(f"{rec['name']}: {zeros - expected} more zero(s) than the manifest records")
    try:
        nm = parse_pattern(pattern)
    except PatternError as e:
        fail("n:m", f"the manifest's pattern cannot be read: {e}")
        return
    if nm is not None:
        n, m = nm
        if weight.shape[1] % m:
            fail("n:m", f"{pattern} needs the input width ({weight.shape[1]}) to be a multiple of {m}")
        else:
            nonzero = (weight != 0).reshape(weight.shape[0], -1, m).sum(-1)
            bad = int((nonzero > n).sum())
            if bad:
                fail("n:m", f"{bad} group(s) of {m} inputs hold more than {n} nonzeros (at most {int(nonzero.max())})")


def _expert_index(name: str) -> int | None:
    """``...experts.5.down_proj`` -> 5 (the manifest's names for fused expert slices)."""
    parts = name.split(".")
    if len(parts) >= 3 and parts[-3] == "experts" and parts[-2].isdigit():
        return int(parts[-2])
    return None


def _block_prefix(key: str) -> str | None:
    """``model.layers.3.mlp.experts.gate_up_proj`` -> ``model.layers.3.`` (None outside numbered blocks)."""
    parts = key.split(".")
    index = next((i for i, p in enumerate(parts) if p.isdigit()), None)
    return None if index is None else ".".join(parts[: index + 1]) + "."


class _ModelLayout:
    """The model's view of the checkpoint: tensors under in-memory names (converted one block at a time
    by transformers' own conversion objects where needed) and the orientation of each layer."""

    def __init__(self, folder: Path, reader: CheckpointReader):
        self.folder, self.reader = folder, reader
        self.notes: list[str] = []
        self._skeleton: Any = None
        self._conversion: Any = None
        self._tried = False
        self._block: tuple[str | None, dict[str, torch.Tensor]] = (None, {})
        self._last: tuple[str | None, Any] = (None, None)

    def _load(self) -> None:
        """The model built on the meta device from ``config.json`` (no weights, no remote code) and its
        checkpoint conversion; both stay None when that cannot be done."""
        if self._tried:
            return
        self._tried = True
        try:
            from ..engine.conversion import CheckpointConversion
            from ..engine.streaming import build_skeleton

            self._skeleton = build_skeleton(self.folder)
            self._conversion = CheckpointConversion(self._skeleton, self.reader.tensor_names())
        except Exception as e:  # noqa: BLE001 - fall back to the keys and shapes as stored
            self.notes.append(f"could not build the model class from config.json ({type(e).__name__}: {e}); "
                              "orientation from shapes, no checkpoint conversion")

    def _read(self, key: str) -> torch.Tensor:
        """One stored tensor; the last one is kept, as the experts of a fused tensor follow each other."""
        if self._last[0] != key:
            file = self.reader.weight_map[key]
            if not (self.folder / file).is_file():
                raise KeyError(f"{key} is listed in {file}, which is missing")
            self._last = (key, read_to_host({self.folder / file: [key]})[0][key])
        return self._last[1]

    def weight(self, key: str, expert: int | None) -> torch.Tensor:
        """The tensor of a layer under its in-memory name (one expert's slice for fused experts)."""
        tensor = self._read(key) if key in self.reader.weight_map else self._converted(key)
        return tensor[expert] if expert is not None and expert >= 0 else tensor

    def _converted(self, key: str) -> torch.Tensor:
        prefix = _block_prefix(key)
        self._load()
        if prefix is None or self._conversion is None or not self._conversion.active:
            raise KeyError(f"{key} is not in the checkpoint")
        if self._block[0] != prefix:
            by_file = self.reader.files([k for k in self.reader.tensor_names() if k.startswith(prefix)])
            missing = sorted(p.name for p in by_file if not p.is_file())
            if missing:
                raise KeyError(f"{key} is converted from tensors in {', '.join(missing)}, which is missing")
            self._block = (prefix, self._conversion.to_model(read_to_host(by_file)[0]) if by_file else {})
        if key not in self._block[1]:
            raise KeyError(f"{key} is not in the checkpoint, even after transformers' conversions")
        return self._block[1][key]

    def transposed(self, rec: dict[str, Any], expert: int | None) -> bool | None:
        """True for GPT-2 ``Conv1D`` and transposed fused experts; None when unknown."""
        if "transposed" in rec:
            return bool(rec["transposed"])
        self._load()
        if self._skeleton is None:
            return None
        name = rec["name"]
        try:
            module = self._skeleton.get_submodule(name.rsplit(".", 2)[0] if expert is not None else name)
        except AttributeError:
            return None
        if expert is not None:
            return bool(getattr(module, "is_transposed", False))
        from transformers.pytorch_utils import Conv1D

        return isinstance(module, Conv1D)

    def orientations(self, rec: dict[str, Any], stored: torch.Tensor, shape: list[int],
                     expert: int | None) -> list[torch.Tensor]:
        """Candidate ``[d_out, d_in]`` views of ``stored``: one when the layout is known, both for a
        square weight of unknown layout."""
        if stored.dim() != 2:
            return []
        known = self.transposed(rec, expert)
        if known is not None:
            w = stored.T if known else stored
            return [w] if list(w.shape) == shape else []
        out = [w for w in (stored, stored.T) if list(w.shape) == shape]
        if len(out) == 2:
            self.notes.append(f"{rec['name']}: square weight of unknown layout; both orientations tried")
        return out


"""verify(): a saved pruned model against its manifest, shard by shard, locally and from the (fake) Hub."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from fake_hub import VALID_TOKEN, fake_hub_session
from manifest_v2 import as_schema_2, flip_byte
from safetensors.torch import load_file, save_file
from tiny_models import build, token_ids

from optimum_statprune import StatPruneConfig, StatPruner
from optimum_statprune.sharing.manifest import MANIFEST_NAME, read_manifest
from optimum_statprune.sharing.verify import load_manifest, verify

LAYER = "model.layers.1.mlp.down_proj"
KEY = f"{LAYER}.weight"


def _save(arch: str, pattern: str, folder, method: str = "magnitude", **save_kwargs):
    model = build(arch)
    pruner = StatPruner.from_pretrained(model, config=StatPruneConfig(method=method, pattern=pattern), device="cpu")
    pruner.prune(token_ids() if method != "magnitude" else None, progress=False)
    pruner.save_pretrained(folder, **save_kwargs)
    return folder


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify")
    return {
        "2:4": _save("llama", "2:4", root / "nm", method="wanda"),
        "unstructured": _save("llama", "unstructured", root / "unstructured"),
    }


@pytest.fixture
def nm(saved, tmp_path):
    return shutil.copytree(saved["2:4"], tmp_path / "nm")


@pytest.fixture
def unstructured(saved, tmp_path):
    return shutil.copytree(saved["unstructured"], tmp_path / "unstructured")


def _rewrite(folder, key, edit):
    """Rewrite the safetensors shard holding ``key`` with ``edit(tensor)`` applied to it in place."""
    for shard in folder.glob("*.safetensors"):
        tensors = load_file(shard)
        if key in tensors:
            edit(tensors[key])
            save_file(tensors, shard, metadata={"format": "pt"})
            return
    raise KeyError(key)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "mixtral", "qwen2_moe", "opt"])
def test_a_clean_pruned_save_verifies(arch, tmp_path, monkeypatch):
    folder = _save(arch, "2:4", tmp_path / arch)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("verify must never unpickle"))
    report = verify(folder)
    assert report.ok, str(report)
    assert report.checked == report.layers == len(read_manifest(folder)["layers"])
    assert report.summary().startswith("OK")


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_a_streamed_pruned_save_verifies(arch, tmp_path):
    """prune(output_dir=...) streams shard to shard: a different writer, the same manifest contract."""
    from tiny_models import tiny_tokenizer

    dense = tmp_path / "dense"
    build(arch).save_pretrained(dense)
    tiny_tokenizer().save_pretrained(dense)
    pruner = StatPruner.from_pretrained(dense, config=StatPruneConfig(method="wanda", pattern="2:4"), device="cpu")
    out = pruner.prune(token_ids(), output_dir=tmp_path / "out", progress=False)
    report = verify(out)
    assert report.ok, str(report)


def test_sharded_save_verifies(tmp_path):
    folder = _save("llama", "4:8", tmp_path / "sharded", max_shard_size="100KB")
    assert len(list(folder.glob("*.safetensors"))) > 1
    assert verify(folder).ok


def test_one_changed_weight_is_caught_by_its_hash(nm):
    def nudge(w):
        i = int(torch.nonzero(w.reshape(-1))[0])  # a kept weight: sparsity and 2:4 stay intact
        w.view(-1)[i] *= 1.0001

    _rewrite(nm, KEY, nudge)
    report = verify(nm)
    assert not report.ok
    # the layer's own record and, with a schema-2 manifest, the tensor's entry both see it
    assert {(m.layer, m.kind) for m in report.mismatches} == {(LAYER, "sha256"), (KEY, "sha256")}
    assert "FAILED" in str(report) and LAYER in str(report)
    assert verify(nm, hashes=False).ok  # the pattern itself is still exact


def test_a_revived_weight_is_caught(unstructured):
    def revive(w):
        w.view(-1)[int(torch.nonzero(w.reshape(-1) == 0)[0])] = 0.5

    _rewrite(unstructured, KEY, revive)
    assert {m.kind for m in verify(unstructured).mismatches} == {"sha256", "sparsity"}
    report = verify(unstructured, hashes=False)
    assert [(m.layer, m.kind) for m in report.mismatches] == [(LAYER, "sparsity")]
    assert "1 pruned weight(s) are nonzero again" in report.mismatches[0].detail


def test_a_broken_nm_group_is_caught(nm):
    def break_group(w):
        """Move one nonzero from the second group of 4 into the first: same count, 3 of 4 in group one."""
        row = w[0]
        first_zero = int(torch.nonzero(row[:4] == 0)[0])
        second_kept = 4 + int(torch.nonzero(row[4:8])[0])
        row[first_zero], row[second_kept] = row[second_kept].clone(), 0.0

    _rewrite(nm, KEY, break_group)
    assert {m.kind for m in verify(nm).mismatches} == {"sha256", "n:m"}
    report = verify(nm, hashes=False)
    assert [(m.layer, m.kind) for m in report.mismatches] == [(LAYER, "n:m")]
    assert "1 group(s) of 4 inputs hold more than 2 nonzeros" in report.mismatches[0].detail


def test_a_missing_tensor_and_a_wrong_shape_are_caught(nm):
    shard = nm / "model.safetensors"
    tensors = load_file(shard)
    del tensors[KEY]
    tensors["model.layers.0.self_attn.q_proj.weight"] = tensors["model.layers.0.self_attn.q_proj.weight"][:32]
    save_file(tensors, shard, metadata={"format": "pt"})
    found = {(m.layer, m.kind) for m in verify(nm).mismatches}
    assert {(LAYER, "missing-tensor"), ("model.layers.0.self_attn.q_proj", "shape")} <= found
    # schema 2 also sees the rewritten file and tensor, and nothing else
    assert {kind for _, kind in found} <= {"missing-tensor", "shape", "sha256", "size"}


def test_a_fine_tuned_copy_is_checked_against_the_original_manifest(nm, tmp_path):
    tuned = shutil.copytree(nm, tmp_path / "tuned")
    (tuned / MANIFEST_NAME).unlink()
    _rewrite(tuned, KEY, lambda w: w.mul_(1.5))  # training changed the kept weights, not the zeros
    assert verify(tuned, manifest=nm, hashes=False).ok
    assert not verify(tuned, manifest=read_manifest(nm)).ok


def test_load_manifest_from_a_directory_or_a_file(nm):
    assert load_manifest(nm) == read_manifest(nm) == load_manifest(nm / MANIFEST_NAME)
    bad = json.loads((nm / MANIFEST_NAME).read_text())
    bad["schema_version"] = 99
    (nm / MANIFEST_NAME).write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="schema 99"):
        load_manifest(nm / MANIFEST_NAME)


def test_verify_a_hub_repo(monkeypatch, tmp_path, nm):
    from optimum_statprune.sharing.hub import push_to_hub

    with fake_hub_session(monkeypatch, tmp_path) as hub:
        push_to_hub(nm, "tester/clean", token=VALID_TOKEN)
        assert verify("tester/clean").ok
        _rewrite(nm, KEY, lambda w: w.add_(1.0))
        push_to_hub(nm, "tester/tampered", token=VALID_TOKEN, check=False)
        report = verify("tester/tampered")
        assert not report.ok and {m.kind for m in report.mismatches} == {"sha256", "sparsity", "n:m"}
        downloaded = {p.rsplit("/", 1)[-1] for _, p, _ in hub.calls("GET", r"/resolve/")}
        assert "README.md" not in downloaded and MANIFEST_NAME in downloaded  # only what verify needs


# ------------------------------------------------------------------------------------------- schema 2
@pytest.fixture(scope="module")
def saved_sharded(tmp_path_factory):
    return _save("llama", "2:4", tmp_path_factory.mktemp("verify2") / "sharded", method="wanda", max_shard_size="100KB")


@pytest.fixture
def sharded2(saved_sharded, tmp_path):
    """A sharded 2:4 save with a schema-2 manifest (a private copy)."""
    folder = shutil.copytree(saved_sharded, tmp_path / "sharded2")
    as_schema_2(folder)
    return folder


def test_schema_2_intact_checks_every_tensor_and_file(sharded2):
    manifest = json.loads((sharded2 / MANIFEST_NAME).read_text())
    assert len(manifest["files"]) > 1
    report = verify(sharded2)
    assert report.ok, str(report)
    assert report.schema == 2 and report.tensors == len(manifest["tensors"]) and report.files == len(manifest["files"])
    assert not report.warnings
    assert f"{len(manifest['tensors'])} tensors in {len(manifest['files'])} file(s)" in report.summary()


def test_schema_2_deleted_shard_with_the_embeddings_and_lm_head_fails(sharded2):
    from optimum_statprune.checkpoint.shards import CheckpointReader

    where = CheckpointReader(sharded2).weight_map
    gone = {where["model.embed_tokens.weight"], where["lm_head.weight"]}
    for name in gone:
        (sharded2 / name).unlink()
    report = verify(sharded2)
    assert not report.ok
    assert {m.layer for m in report.by_kind("missing-file")} == gone
    missing = {m.layer for m in report.by_kind("missing-tensor")}
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= missing
    assert not verify(sharded2, hashes=False).ok  # presence is checked without hashes too


def test_schema_2_one_flipped_byte_in_a_norm_weight_fails(sharded2):
    key = "model.layers.0.input_layernorm.weight"
    flip_byte(sharded2, key, at=5)
    report = verify(sharded2)
    assert [(m.layer, m.kind) for m in report.mismatches] == [(key, "sha256")]
    assert verify(sharded2, hashes=False).ok  # not a pruned layer: only its hash could tell


def test_schema_2_an_extra_tensor_fails(sharded2):
    from optimum_statprune.checkpoint.shards import CheckpointReader

    shard = sharded2 / CheckpointReader(sharded2).weight_map["model.norm.weight"]
    tensors = load_file(shard)
    tensors["model.backdoor.weight"] = torch.ones(4)
    save_file(tensors, shard, metadata={"format": "pt"})
    report = verify(sharded2)
    assert ("model.backdoor.weight", "unexpected-tensor") in {(m.layer, m.kind) for m in report.mismatches}
    assert (shard.name, "size") in {(m.layer, m.kind) for m in report.mismatches}
    assert {m.kind for m in verify(sharded2, hashes=False).mismatches} >= {"unexpected-tensor"}


def test_schema_2_a_fine_tuned_copy_without_hashes(sharded2, tmp_path):
    tuned = shutil.copytree(sharded2, tmp_path / "tuned")
    (tuned / MANIFEST_NAME).unlink()
    _rewrite(tuned, KEY, lambda w: w.mul_(1.5))  # kept weights changed, zeros kept, file sizes the same
    _rewrite(tuned, "model.norm.weight", lambda w: w.add_(0.25))
    assert verify(tuned, manifest=sharded2, hashes=False).ok
    kinds = {m.kind for m in verify(tuned, manifest=sharded2).mismatches}
    assert kinds == {"sha256"}


def test_schema_1_warns_that_other_tensors_are_not_covered(unstructured):
    manifest = json.loads((unstructured / MANIFEST_NAME).read_text())
    for key in ("tensors", "files"):  # what a manifest written before schema 2 lacks
        manifest.pop(key, None)
    manifest["schema_version"] = 1
    (unstructured / MANIFEST_NAME).write_text(json.dumps(manifest))
    flip_byte(unstructured, "model.norm.weight")
    report = verify(unstructured)
    assert report.ok and report.schema == 1  # what a schema-1 manifest cannot see
    assert any("not covered" in w for w in report.warnings)
    assert "schema-1" in report.summary() and "warning:" in str(report)


def test_load_manifest_reads_schema_1_and_2(sharded2, tmp_path):
    assert load_manifest(sharded2)["schema_version"] == 2
    manifest = json.loads((sharded2 / MANIFEST_NAME).read_text())
    del manifest["tensors"]
    (tmp_path / "broken.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="without its 'tensors' and 'files'"):
        load_manifest(tmp_path / "broken.json")


def test_fused_experts_are_read_through_the_engines_conversion(tmp_path, monkeypatch):
    """One reversal of transformers' checkpoint conversion: engine.conversion's, as streaming uses."""
    from optimum_statprune.engine.conversion import CheckpointConversion

    folder = _save("mixtral", "2:4", tmp_path / "mixtral")
    calls = []
    original = CheckpointConversion.to_model

    def counting(self, tensors):
        calls.append(sorted(tensors))
        return original(self, tensors)

    monkeypatch.setattr(CheckpointConversion, "to_model", counting)
    assert verify(folder).ok
    assert calls and any("experts" in k for keys in calls for k in keys)


def test_schema_2_a_fine_tuned_copy_sharded_differently(sharded2, tmp_path):
    """Without hashes the manifest's file list does not bind: a fine-tuned copy is saved as it likes."""
    from transformers import AutoModelForCausalLM

    tuned = tmp_path / "tuned"
    AutoModelForCausalLM.from_pretrained(sharded2).save_pretrained(tuned)  # one file, not the shards
    assert [p.name for p in tuned.glob("*.safetensors")] == ["model.safetensors"]
    assert verify(tuned, manifest=sharded2, hashes=False).ok
    assert {m.kind for m in verify(tuned, manifest=sharded2).mismatches} == {"missing-file", "unexpected-file"}


def test_schema_2_a_truncated_shard_and_a_stale_one(sharded2):
    from optimum_statprune.checkpoint.shards import CheckpointReader

    shard = sharded2 / CheckpointReader(sharded2).weight_map[KEY]
    shutil.copy(shard, sharded2 / "model-00009-of-00009.safetensors")  # left over from an earlier save
    shard.write_bytes(shard.read_bytes()[:-100])
    report = verify(sharded2)
    found = {(m.layer, m.kind) for m in report.mismatches}
    assert (shard.name, "size") in found and ("model-00009-of-00009.safetensors", "unexpected-file") in found
    assert {m.kind for m in report.mismatches} <= {"size", "unexpected-file", "unreadable", "missing-tensor"}
    assert any(m.kind == "unreadable" for m in report.mismatches)

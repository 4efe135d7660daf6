"""Models dispatched with an accelerate ``device_map`` ("cpu" and "disk" offload) prune exactly like the same
model in memory, keep their offloaded weights offloaded, and save the pruned values."""

from __future__ import annotations

import hashlib
import math

import pytest
import torch
import transformers as tf
from accelerate import dispatch_model
from accelerate.hooks import AlignDevicesHook, SequentialHook
from accelerate.utils import OffloadedWeightsLoader, PrefixedDataset
from tiny_models import VOCAB, token_ids
from transformers import AutoModelForCausalLM

from optimum_statprune import StatPruneConfig, StatPruner
from optimum_statprune.engine.offload import _source, offloaded_tensor
from optimum_statprune.engine.targets import find_blocks, find_targets

# Blocks and outside modules alternate between host and disk offload; the main device is the CPU.
DEVICE_MAP = {
    "model.embed_tokens": "disk",
    "model.rotary_emb": "cpu",
    "model.layers.0": "cpu",
    "model.layers.1": "disk",
    "model.layers.2": "cpu",
    "model.layers.3": "disk",
    "model.norm": "disk",
    "lm_head": "cpu",
}
CONFIGS = {
    "wanda": dict(method="wanda"),
    "statprune-2:4": dict(method="statprune", pattern="2:4"),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                         intermediate_size=128, num_key_value_heads=2, max_position_embeddings=256)
    path = tmp_path_factory.mktemp("tiny-llama")
    tf.LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def _load_transformers(path, tmp):
    """transformers' own dispatch: on a CPU-only machine the "cpu" entries stay in memory and the "disk" ones
    are read from the source checkpoint's safetensors through an index."""
    return AutoModelForCausalLM.from_pretrained(path, device_map=DEVICE_MAP, offload_folder=tmp / "offload")


def _load_accelerate(path, tmp):
    """accelerate's dispatch as on a GPU machine: "cpu" entries in a host dict, "disk" ones in ``.dat`` files.
    ``cpu:0`` stands in for the GPU (with a main device of plain "cpu", accelerate never offloads "cpu"
    entries); the hooks then run on plain "cpu", as ``Parameter.to("cpu:0")`` would drop the Parameter class."""
    model = AutoModelForCausalLM.from_pretrained(path)
    dispatch_model(model, DEVICE_MAP, main_device=torch.device("cpu", 0), offload_dir=str(tmp / "offload"))
    for module in model.modules():
        hook = getattr(module, "_hf_hook", None)
        for h in hook.hooks if isinstance(hook, SequentialHook) else [hook]:
            if isinstance(h, AlignDevicesHook):
                h.execution_device = torch.device("cpu")
    return model


LOADERS = {"transformers": _load_transformers, "accelerate": _load_accelerate}


def _values(model) -> dict[str, torch.Tensor]:
    """Every parameter's value, from the hooks' weights maps where it is offloaded."""
    return {n: offloaded_tensor(model, n) if p.device.type == "meta" else p.detach()
            for n, p in model.named_parameters()}


def _storage_kinds(model) -> set[str]:
    """Which weights-map storages hold the model's offloaded parameters: "dict" (host) and/or "file" (disk)."""
    kinds = set()
    for n, p in model.named_parameters():
        if p.device.type == "meta":
            weights_map, key = _source(model, n)
            while isinstance(weights_map, PrefixedDataset):
                key, weights_map = weights_map.prefix + key, weights_map.dataset
            assert isinstance(weights_map, OffloadedWeightsLoader)
            kinds.add("dict" if key in weights_map.state_dict else "file")
    return kinds


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _assert_sparse(model, config: StatPruneConfig, values) -> None:
    path, blocks = find_blocks(model)
    targets = [t for i, b in enumerate(blocks) for t in find_targets(b, f"{path}.{i}")]
    assert targets
    for t in targets:
        w = values[t.state_key]
        if config.pattern == "unstructured":
            assert torch.all((w == 0).sum(dim=1) >= math.floor(config.sparsity * w.shape[1])), t.name
        else:
            n, m = (int(v) for v in config.pattern.split(":"))
            assert torch.all((w != 0).reshape(w.shape[0], -1, m).sum(-1) <= n), t.name


@pytest.mark.parametrize("loader", sorted(LOADERS))
@pytest.mark.parametrize("preset", sorted(CONFIGS))
def test_offloaded_model_prunes_like_the_model_in_memory(checkpoint, tmp_path, loader, preset):
    config = StatPruneConfig(**CONFIGS[preset], sample_tokens=32, batch_size=4)
    calibration = token_ids(6, 16)
    source_hash = _sha(checkpoint / "model.safetensors")

    reference = StatPruner.from_pretrained(AutoModelForCausalLM.from_pretrained(checkpoint), config=config, device="cpu")
    reference.prune(calibration, progress=False)
    expected = {n: p.detach() for n, p in reference.model.named_parameters()}

    model = LOADERS[loader](checkpoint, tmp_path)
    offloaded = {n for n, p in model.named_parameters() if p.device.type == "meta"}
    hooked = {n for n, m in model.named_modules() if "forward" in m.__dict__ and hasattr(m, "_hf_hook")}
    assert offloaded and any(n.startswith("model.layers.") for n in offloaded)
    assert _storage_kinds(model) == ({"file"} if loader == "transformers" else {"dict", "file"})

    pruner = StatPruner.from_pretrained(model, config=config, device="cpu")
    pruner.prune(calibration, progress=False)

    # bit for bit the in-memory result, with the offloaded weights still offloaded and the hooks back
    values = _values(model)
    assert values.keys() == expected.keys()
    for n, v in values.items():
        assert torch.equal(v, expected[n]), n
    _assert_sparse(model, config, values)
    assert all(rec["sparsity"] == pytest.approx(0.5) for rec in pruner.report.layers)
    assert {n for n, p in model.named_parameters() if p.device.type == "meta"} == offloaded
    assert {n for n, m in model.named_modules() if "forward" in m.__dict__ and hasattr(m, "_hf_hook")} == hooked
    ids = token_ids(2, 12, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference.model(ids).logits, rtol=0, atol=0)
    assert _sha(checkpoint / "model.safetensors") == source_hash  # the source shards are never rewritten

    out = tmp_path / "pruned"
    pruner.save_pretrained(out)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    for n, p in reloaded.named_parameters():
        assert torch.equal(p, expected[n]), n
    reference.save_pretrained(tmp_path / "reference")
    hashes = {rec["name"]: rec["sha256"] for rec in reference.manifest()["layers"]}
    assert {rec["name"]: rec["sha256"] for rec in pruner.manifest()["layers"]} == hashes


def test_owl_and_a_new_bias_on_offloaded_linears(checkpoint, tmp_path):
    """OWL reads every block before pruning any; bias compensation adds parameters to offloaded linears,
    which must land in the weights map too."""
    config = StatPruneConfig(method="wanda", owl=True, owl_threshold=2.0, compensation="bias", add_bias=True,
                             sample_tokens=32, batch_size=4)
    calibration = token_ids(6, 16)
    reference = AutoModelForCausalLM.from_pretrained(checkpoint)
    StatPruner.from_pretrained(reference, config=config, device="cpu").prune(calibration, progress=False)
    expected = {n: p.detach() for n, p in reference.named_parameters()}
    assert any(n.endswith(".bias") for n in expected)

    model = _load_accelerate(checkpoint, tmp_path)
    StatPruner.from_pretrained(model, config=config, device="cpu").prune(calibration, progress=False)
    values = _values(model)
    assert values.keys() == expected.keys()
    for n, v in values.items():
        assert torch.equal(v, expected[n]), n
    assert model.model.layers[1].mlp.down_proj.bias.device.type == "meta"  # an offloaded block's new bias
    ids = token_ids(2, 12, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=0)

"""Biases added by bias compensation survive save and reload, or saving says why it cannot."""

from __future__ import annotations

import pytest
import torch
from tiny_models import build, token_ids
from transformers import AutoModelForCausalLM

from optimum_statprune import StatPruneConfig, StatPruner
from optimum_statprune.engine.biases import declare_added_biases

BIAS_CONFIG = {"method": "wanda", "compensation": "bias", "add_bias": True, "batch_size": 4}


def _pruned(arch: str, **extra):
    model = build(arch, seed=3)
    pruner = StatPruner.from_pretrained(model, config=StatPruneConfig(**BIAS_CONFIG, **extra), device="cpu")
    pruner.prune(token_ids(8, 16, seed=4), progress=False)
    return model, pruner


def test_added_biases_are_declared_and_reload_identically(tmp_path):
    model, pruner = _pruned("llama")
    added = [n for n, _ in model.named_parameters() if n.endswith(".bias")]
    assert added and model.config.attention_bias is False
    ids = token_ids(2, 16, seed=9)
    with torch.no_grad():
        before = model(ids).logits
    pruner.save_pretrained(tmp_path / "out")
    assert model.config.attention_bias is True and model.config.mlp_bias is True
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert reloaded.config.attention_bias is True
    for name, p in model.state_dict().items():
        assert torch.equal(reloaded.state_dict()[name], p), name
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, before, rtol=0, atol=0)


def test_only_the_flags_needed_are_set():
    model, _ = _pruned("llama", targets=[r"self_attn\.(q|k|v|o)_proj"])
    assert declare_added_biases(model) == ["attention_bias"]
    assert model.config.mlp_bias is False
    assert model.model.layers[0].mlp.up_proj.bias is None
    assert torch.count_nonzero(model.model.layers[0].self_attn.o_proj.bias) > 0


def test_nothing_added_nothing_changed():
    model = build("llama", seed=3)
    assert declare_added_biases(model) == []
    assert model.config.attention_bias is False


def test_biases_no_config_can_describe_are_refused(tmp_path):
    model, pruner = _pruned("mistral")  # MistralConfig has no bias flags at all
    with pytest.raises(ValueError, match="add_bias=False"):
        pruner.save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_streaming_refuses_add_bias_before_doing_anything(tmp_path):
    build("llama", seed=3).save_pretrained(tmp_path / "src")
    config = StatPruneConfig(**BIAS_CONFIG)
    pruner = StatPruner.from_pretrained(str(tmp_path / "src"), config=config, device="cpu")
    with pytest.raises(ValueError, match="streaming"):
        pruner.prune(token_ids(8, 16), output_dir=tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()

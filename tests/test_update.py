"""The weight update as a step after any mask (``StatPruneConfig.update``), through the whole engine: exact
counts and N:M groups, no revived weight, lower output error than the mask alone, the manifest record,
streaming, OWL, per-layer groups, MoE experts, the config's rules and the ``quality`` preset."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from tiny_models import build, starve_expert, token_ids
from torch import nn

from optimum_statprune import StatPruneConfig, StatPruner
from optimum_statprune.engine.observer import Observer
from optimum_statprune.engine.prune_step import prune_target
from optimum_statprune.engine.targets import Target, find_blocks, find_targets
from optimum_statprune.methods import get_method
from optimum_statprune.sharing.manifest import MANIFEST_NAME
from optimum_statprune.sharing.verify import verify
from optimum_statprune.tensor_math import weight_update
from optimum_statprune.tensor_math.masks import prune_count
from optimum_statprune.tensor_math.scores import cvr_score, magnitude_score, wanda_score
from optimum_statprune.tensor_math.sparsegpt import HessianAccumulator
from optimum_statprune.tensor_math.stats import ChannelStats, GramAccumulator, LayerStatistics
from optimum_statprune.tensor_math.weight_update import nm_groups_intact

IDS = token_ids(4, 16)


def _prune(arch="llama", ids=IDS, **kwargs):
    model = build(arch)
    pruner = StatPruner.from_pretrained(model, config=StatPruneConfig(**kwargs), device="cpu")
    pruner.prune(ids, progress=False)
    return model, pruner


def _targets(model):
    path, blocks = find_blocks(model)
    return [t for i, b in enumerate(blocks) for t in find_targets(b, f"{path}.{i}")]


def _block0_inputs(arch="llama", ids=IDS):
    """Each block-0 linear's input rows on the dense model: what the block-0 statistics are built from."""
    model = build(arch)
    path, blocks = find_blocks(model)
    targets = find_targets(blocks[0], f"{path}.0")
    seen, handles = {}, []
    for t in targets:
        def hook(module, args, name=t.name):
            seen[name] = args[0].detach().reshape(-1, args[0].shape[-1]).double()
        handles.append(t.module.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(ids)
    for h in handles:
        h.remove()
    return seen


# ------------------------------------------------------------------------------------------- column factor
def _channel(d_in=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    stats = ChannelStats(d_in)
    stats.update(torch.randn(64, d_in, generator=g) * 3 + 1)
    return stats


@pytest.mark.parametrize(
    "method, reference",
    [
        ("magnitude", lambda w, s, c: magnitude_score(w)),
        ("wanda", lambda w, s, c: wanda_score(w, s)),
        ("cvr", lambda w, s, c: cvr_score(w, s, 1.0, c.eps, "column", "variance", 0.5)),
        ("statprune", lambda w, s, c: cvr_score(w, s, 0.5, c.eps, "column", "second_moment", 1.0)),
    ],
)
def test_column_factor_reproduces_the_separable_scores(method, reference):
    stats, w = _channel(), torch.randn(5, 12)
    config = StatPruneConfig(method=method)
    factor = get_method(method).column_factor(w, _wrap(stats), config)
    torch.testing.assert_close(w.abs() * factor, reference(w, stats, config))
    torch.testing.assert_close(get_method(method).score(w, _wrap(stats), config), reference(w, stats, config))


def _wrap(channel):
    stats = LayerStatistics(channel.dim)
    stats.channel = channel
    return stats


def test_column_factor_of_ria_is_its_activation_part_and_none_where_there_is_none():
    stats, w = _channel(), torch.randn(5, 12)
    for method in ("ria", "quality"):
        factor = get_method(method).column_factor(w, _wrap(stats), StatPruneConfig(method=method, ria_power=0.7))
        torch.testing.assert_close(factor, stats.norm.pow(0.7).float())
    assert get_method("sparsegpt").column_factor(w, _wrap(stats), StatPruneConfig(method="sparsegpt")) is None
    # CVR with row dispersion: the activation part (a per-row factor does not reorder a row)
    cfg = StatPruneConfig(method="cvr", weight_stat_axis="row")
    torch.testing.assert_close(get_method("cvr").column_factor(w, _wrap(stats), cfg), stats.variance.pow(0.25).float())


def test_no_name_branching_is_left_in_the_update():
    assert not hasattr(weight_update, "score_column_factor")


# ------------------------------------------------------------------------------------------- through the engine
@pytest.mark.parametrize("pattern", ["unstructured", "2:4", "4:8"])
@pytest.mark.parametrize("method, extra", [("quality", {}), ("wanda", {"update": "admm"}),
                                           ("magnitude", {"update": "admm", "update_mask_steps": 5})])
def test_exact_counts_and_groups_and_every_layer_recorded(pattern, method, extra):
    model, pruner = _prune(method=method, pattern=pattern, **extra)
    records = {r["name"]: r for r in pruner.report.layers}
    for t in _targets(model):
        w = t.weight()
        kept = w != 0
        if pattern == "unstructured":
            assert ((~kept).sum(1) == prune_count(w.shape[1], 0.5)).all(), t.name
        else:
            n, m = map(int, pattern.split(":"))
            assert nm_groups_intact(kept, n, m), t.name
        rec = records[t.name]["update"]
        assert rec["applied"] and rec["kind"] == "admm" and rec["iters"] == 20 and rec["retries"] == 0
        assert rec["damp"] == 0.1 and rec["mask_steps"] == (15 if method == "quality" else extra.get("update_mask_steps", 0))
        assert 0 <= rec["error"] < rec["error_mask"], t.name
        assert records[t.name]["sparsity"] == 0.5


def test_fixed_mask_update_never_revives_and_lowers_each_layers_output_error():
    """Block 0 sees the dense inputs in both runs, so the fixed-mask update keeps exactly Wanda's mask; its
    output error on the real inputs is lower than the mask alone's for every linear, and the manifest's
    errors are those errors."""
    masked, _ = _prune(method="wanda")
    updated, pruner = _prune(method="wanda", update="admm")
    dense = build("llama")
    xs = _block0_inputs()
    records = {r["name"]: r for r in pruner.report.layers}
    block0 = [t for t in _targets(updated) if ".layers.0." in t.name]
    by_name = {t.name: t for t in _targets(masked)} | {"dense." + t.name: t for t in _targets(dense)}
    assert len(block0) == 7
    for t in block0:
        w, wm, w0 = t.weight().double(), by_name[t.name].weight().double(), by_name["dense." + t.name].weight().double()
        assert torch.equal(w != 0, wm != 0), t.name  # the same mask: nothing revived, nothing extra pruned
        x = xs[t.name]
        err = (x @ (w0 - w).T).square().sum().item()
        err_mask = (x @ (w0 - wm).T).square().sum().item()
        assert err < 0.9 * err_mask, t.name
        rec = records[t.name]["update"]
        assert rec["error"] == pytest.approx(err, rel=1e-3) and rec["error_mask"] == pytest.approx(err_mask, rel=1e-3)


def test_gradual_mask_keeps_pruned_weights_pruned_and_can_change_the_mask():
    masked, _ = _prune(method="ria")
    updated, pruner = _prune(method="quality")
    t_upd = {t.name: t for t in _targets(updated)}
    changed = 0
    for t in _targets(masked):
        if ".layers.0." in t.name:
            changed += int(((t.weight() != 0) != (t_upd[t.name].weight() != 0)).sum())
    assert changed > 0  # the gradual mask re-chose some weights
    assert all(r["update"]["mask_ranking"] == "quality" for r in pruner.report.layers)


def test_streamed_is_bit_identical_to_in_memory_and_the_manifest_holds_the_update(tmp_path):
    src = tmp_path / "src"
    build("llama").save_pretrained(src, max_shard_size="40KB")
    config = StatPruneConfig(method="quality", pattern="2:4")
    streamed = StatPruner.from_pretrained(src, config=config, device="cpu")
    streamed.prune(IDS, output_dir=tmp_path / "streamed", progress=False)
    in_memory = StatPruner.from_pretrained(src, config=config, device="cpu")
    in_memory.prune(IDS, progress=False)
    from safetensors.torch import load_file

    tensors = {}
    for f in sorted((tmp_path / "streamed").glob("*.safetensors")):
        tensors.update(load_file(f))
    state = in_memory.model.state_dict()
    assert tensors and all(torch.equal(v, state[k]) for k, v in tensors.items())
    manifest = json.loads((tmp_path / "streamed" / MANIFEST_NAME).read_text())
    assert manifest["config"]["update"] == "admm" and manifest["config"]["update_mask_steps"] == 15
    assert len(manifest["layers"]) == 14
    for rec in manifest["layers"]:
        assert set(rec["update"]) >= {"kind", "applied", "damp", "retries", "iters", "error_mask", "error"}
        assert rec["compensation"] == {"kind": "none", "applied": False}
    report = verify(tmp_path / "streamed")  # the re-chosen masks are what the manifest says: 2:4, 50%
    assert report.ok, report.summary()


def test_owl_sparsities_are_kept_exactly_by_the_gradual_mask():
    model, pruner = _prune(method="quality", owl=True, owl_lambda=0.1, ids=token_ids(6, 16))
    owl = pruner.report.owl
    assert max(owl["block_sparsity"]) > 0.5 > min(owl["block_sparsity"])
    zeros = sum(int((t.weight() == 0).sum()) for t in _targets(model))
    assert zeros == owl["pruned"] == owl["total"] // 2  # every layer's OWL count, exactly
    assert all(r["update"]["applied"] for r in pruner.report.layers)


def test_layer_groups_are_kept_exactly_by_the_gradual_mask():
    model, pruner = _prune(method="quality", group="layer", sparsity=0.6)
    for t in _targets(model):
        assert int((t.weight() == 0).sum()) == prune_count(t.weight().numel(), 0.6), t.name
    assert any(len(set((t.weight() == 0).sum(1).tolist())) > 1 for t in _targets(model))  # rows differ


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_experts_without_tokens_fall_back_and_the_others_are_updated(arch):
    model = build(arch)
    _, blocks = find_blocks(model)
    starve_expert(blocks, 3)
    pruner = StatPruner.from_pretrained(model, config=StatPruneConfig(method="quality"), device="cpu")
    pruner.prune(IDS, progress=False)
    records = {r["name"]: r for r in pruner.report.layers}
    starved = [n for n in records if ".experts.3." in n]
    assert starved and all("fallback" in records[n] for n in starved)
    assert all(records[n]["update"] == {"kind": "admm", "applied": False, "reason": "no calibration tokens reached this weight"}
               for n in starved)
    fed = [n for n in records if "fallback" not in records[n]]
    assert fed and all(records[n]["update"]["applied"] for n in fed)
    assert all(records[n]["sparsity"] == 0.5 for n in records)


def test_update_statistics_come_from_one_pass_with_the_fast_gram():
    model = build("llama")
    path, blocks = find_blocks(model)
    targets = find_targets(blocks[0], f"{path}.0")
    quality = Observer(targets, StatPruneConfig(method="quality"), torch.device("cpu"), 0)
    sparsegpt = Observer(targets, StatPruneConfig(method="sparsegpt"), torch.device("cpu"), 0)
    assert (quality.channel, quality.hessian, quality.fast_gram) == (True, True, True)
    assert (sparsegpt.channel, sparsegpt.hessian, sparsegpt.fast_gram) == (False, True, False)
    assert type(LayerStatistics(4, hessian=True, fast_gram=True).hessian) is GramAccumulator
    assert type(LayerStatistics(4, hessian=True).hessian) is HessianAccumulator


def test_retries_are_recorded_and_warned_and_a_hopeless_layer_keeps_the_methods_weights(monkeypatch, caplog):
    real = weight_update._inverse
    calls = []

    def fail_first(a):
        calls.append(1)
        return None if len(calls) == 1 else real(a)

    monkeypatch.setattr(weight_update, "_inverse", fail_first)
    with caplog.at_level(logging.WARNING):
        _, pruner = _prune(method="wanda", update="admm")
    first = pruner.report.layers[0]["update"]
    assert first["retries"] == 1 and first["damp"] == pytest.approx(1.0) and first["applied"]
    assert all(r["update"]["retries"] == 0 for r in pruner.report.layers[1:])
    assert "weight update needed 1 retries" in caplog.text

    monkeypatch.setattr(weight_update, "_inverse", lambda a: None)
    caplog.clear()
    masked, _ = _prune(method="wanda")
    with caplog.at_level(logging.WARNING):
        kept, pruner = _prune(method="wanda", update="admm")
    assert all(not r["update"]["applied"] and "weight update failed" in r["update"]["reason"] for r in pruner.report.layers)
    assert "weight update skipped" in caplog.text
    for a, b in zip(_targets(masked), _targets(kept), strict=True):
        assert torch.equal(a.weight(), b.weight())


# ------------------------------------------------------------------------------------------- hypothesis
@settings(max_examples=25, deadline=None)
@given(
    d_out=st.integers(1, 6),
    groups=st.integers(1, 4),
    nm=st.sampled_from([(1, 2), (2, 4), (4, 8), (3, 8), (1, 4)]),
    method=st.sampled_from(["magnitude", "wanda", "ria", "cvr", "statprune"]),
    steps=st.integers(0, 6),
    seed=st.integers(0, 2**16),
)
def test_nm_groups_are_never_broken_through_the_whole_prune_step(d_out, groups, nm, method, steps, seed):
    n, m = nm
    d_in = groups * m
    g = torch.Generator().manual_seed(seed)
    layer = nn.Linear(d_in, d_out, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(d_out, d_in, generator=g))
    config = StatPruneConfig(method=method, pattern=f"{n}:{m}", update="admm", update_iters=6, update_mask_steps=steps)
    stats = LayerStatistics(d_in, hessian=True, fast_gram=True)
    x = torch.randn(32, d_in, generator=g) * torch.rand(d_in, generator=g) * 4
    x[:, int(torch.randint(d_in, (1,), generator=g))] = 0.0  # a dead input
    stats.update(x)
    w0 = layer.weight.detach().clone()
    record = prune_target(Target("layer", layer, "linear"), stats, config)
    kept = layer.weight != 0
    assert w0.ne(0).all() and nm_groups_intact(kept, n, m)
    assert record["sparsity"] == pytest.approx(1 - n / m) and record["update"]["applied"]


# ------------------------------------------------------------------------------------------- config
def test_the_config_refuses_what_the_update_cannot_do():
    with pytest.raises(ValueError, match="update='admm' is not valid: sparsegpt updates the surviving weights"):
        StatPruneConfig(method="sparsegpt", update="admm")
    with pytest.raises(ValueError, match="compensation='lsq' is not valid: the weight update"):
        StatPruneConfig(method="wanda", update="admm", compensation="lsq")
    with pytest.raises(ValueError, match="compensation='ec' is not valid"):
        StatPruneConfig(method="quality", compensation="ec")
    with pytest.raises(ValueError, match="update_mask_steps=15 is not valid: .* at most update_iters=10"):
        StatPruneConfig(method="quality", update_iters=10)
    with pytest.raises(ValueError, match="update_mask_steps=21"):
        StatPruneConfig(method="wanda", update_mask_steps=21)
    for name, bad in (("update", "sgd"), ("update_iters", 0), ("update_damp", 0.0), ("update_rho", -1.0),
                      ("update_mask_steps", -1), ("update_tf32", "yes")):
        with pytest.raises(ValueError, match=f"StatPruneConfig.{name}="):
            StatPruneConfig(method="wanda", **{name: bad})
    # the update with compensation "none" spelled out, and with a preset's compensation (which gives way)
    assert StatPruneConfig(method="wanda", update="admm", compensation="none").statistics == {"channel", "hessian"}
    cfg = StatPruneConfig(method="statprune", update="admm")
    assert cfg.resolved_compensation() == "none" and cfg.resolved()["compensation"] == "none"
    assert StatPruneConfig(method="magnitude", update="admm").statistics == {"hessian"}


def test_the_quality_preset_resolves_as_documented():
    cfg = StatPruneConfig(method="quality")
    resolved = cfg.resolved()
    assert (resolved["update"], resolved["update_mask_steps"], resolved["update_iters"]) == ("admm", 15, 20)
    assert (resolved["update_damp"], resolved["update_rho"], resolved["compensation"]) == (0.1, 1.0, "none")
    assert cfg.statistics == {"channel", "hessian"}
    assert isinstance(get_method("quality"), type(get_method("ria")))  # RIA's score
    w, stats = torch.randn(4, 12), _wrap(_channel())
    torch.testing.assert_close(get_method("quality").score(w, stats, cfg), get_method("ria").score(w, stats, cfg))
    assert StatPruneConfig(method="quality", update_mask_steps=0).resolve("update_mask_steps") == 0
    assert StatPruneConfig(method="quality", update="none").statistics == {"channel"}
    assert StatPruneConfig(method="quality", update="none", update_iters=10).update_iters == 10  # steps unused
    # statprune stays the fast preset: no update
    assert StatPruneConfig(method="statprune").resolve("update") == "none"
    assert StatPruneConfig().resolved()["update"] == "none"
    assert StatPruneConfig.from_dict(resolved).resolved() == resolved  # the manifest's config reloads as run

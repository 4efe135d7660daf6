"""The block loop on tiny random models of every supported architecture."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import BUILDERS, build, starve_expert, token_ids
from transformers import AutoModelForCausalLM

from optimum_statprune import StatPruneConfig, StatPruner
from optimum_statprune.checkpoint.shards import tensor_sha256
from optimum_statprune.engine.capture import call_block, capture_block_inputs
from optimum_statprune.engine.loop import iter_batches
from optimum_statprune.engine.targets import UnsupportedModelError, find_blocks, find_targets
from optimum_statprune.sharing.manifest import MANIFEST_NAME

ARCHS = sorted(BUILDERS)


def _targets(model, config=None):
    path, blocks = find_blocks(model)
    cfg = config or StatPruneConfig()
    return [t for i, b in enumerate(blocks) for t in find_targets(b, f"{path}.{i}", cfg.targets, cfg.ignore)]


def _outside_blocks(model):
    path, _ = find_blocks(model)
    return {k: v.clone() for k, v in model.state_dict().items() if not k.startswith(path + ".")}


@pytest.mark.parametrize("arch", ARCHS)
def test_captured_inputs_reproduce_the_models_own_forward(arch):
    """Running the blocks one by one on the captured arguments gives the model's own hidden states,
    block by block, so the capture carries every per-block argument (masks, rotary, sliding windows)."""
    model = build(arch)
    ids = token_ids(4, 20)
    with torch.no_grad():
        reference = model(ids, output_hidden_states=True, use_cache=False).hidden_states
    path, blocks = find_blocks(model)
    batches = list(iter_batches(ids, None, 3))
    inputs = capture_block_inputs(model, path, blocks, batches, torch.device("cpu"))
    hidden = inputs.hidden
    torch.testing.assert_close(torch.cat(hidden), reference[0])
    with torch.no_grad():
        for i, block in enumerate(blocks):
            hidden = [call_block(block, inputs, i, b, h) for b, h in enumerate(hidden)]
            if i < len(blocks) - 1:  # the last entry has the final norm applied
                torch.testing.assert_close(torch.cat(hidden), reference[i + 1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(
    "method,pattern",
    [("wanda", "unstructured"), ("statprune", "2:4"), ("magnitude", "4:8"), ("sparsegpt", "unstructured")],
)
def test_every_architecture_prunes_exactly(arch, method, pattern):
    model = build(arch)
    outside = _outside_blocks(model)
    config = StatPruneConfig(method=method, pattern=pattern, sample_tokens=32, batch_size=4)
    pruner = StatPruner.from_pretrained(model, config=config, device="cpu")
    pruner.prune(token_ids(6, 16), progress=False)
    targets = _targets(model, config)
    assert len(pruner.report.layers) == len(targets) > 0
    for t in targets:
        w = t.weight()
        if pattern == "unstructured":
            per_row = (w == 0).sum(dim=1)
            assert torch.all(per_row >= math.floor(0.5 * w.shape[1])), t.name
        else:
            n, m = (int(v) for v in pattern.split(":"))
            nonzero = (w != 0).reshape(w.shape[0], -1, m).sum(-1)
            assert torch.all(nonzero <= n), t.name
    for rec in pruner.report.layers:
        assert rec["sparsity"] == pytest.approx(0.5), rec["name"]
    # embeddings, final norm and lm_head are never touched
    for k, v in _outside_blocks(model).items():
        assert torch.equal(v, outside[k]), k
    with torch.no_grad():
        assert torch.isfinite(model(token_ids(2, 12)).logits).all()


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_starved_expert_falls_back_to_magnitude(arch):
    model = build(arch)
    path, blocks = find_blocks(model)
    starve_expert(blocks, 3)
    pruner = StatPruner.from_pretrained(model, config=StatPruneConfig(method="wanda"), device="cpu")
    pruner.prune(token_ids(4, 16), progress=False)
    records = {r["name"]: r for r in pruner.report.layers}
    starved = [n for n in records if ".experts.3." in n]
    assert starved and all("fallback" in records[n] and records[n]["tokens"] == 0 for n in starved)
    fed = [n for n in records if ".experts.0." in n]
    assert fed and all("fallback" not in records[n] and records[n]["tokens"] > 0 for n in fed)
    # the fallback is exactly magnitude pruning of the original weight
    fresh = build(arch)
    _, fresh_blocks = find_blocks(fresh)
    w0 = fresh_blocks[0].mlp.experts.gate_up_proj[3]
    w = blocks[0].mlp.experts.gate_up_proj[3]
    keep = torch.ones_like(w0, dtype=torch.bool)
    keep.scatter_(1, torch.sort(w0.abs(), dim=1, stable=True).indices[:, : w0.shape[1] // 2], False)
    assert torch.equal(w != 0, keep)


def _reference_wanda(model, ids, sparsity):
    """The original Wanda loop, re-implemented naively: for each block in order, hook its linears,
    run the whole (partly pruned) model on the calibration samples, accumulate the running mean of
    squared input norms, then prune each row's lowest |W| * sqrt(scaler)."""
    path, blocks = find_blocks(model)
    masks = {}
    for i, block in enumerate(blocks):
        linears = {n: m for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
        scaler = {n: torch.zeros(m.in_features, dtype=torch.float64) for n, m in linears.items()}
        seen = dict.fromkeys(linears, 0)
        handles = []
        for n, m in linears.items():

            def hook(module, args, n=n, scaler=scaler, seen=seen):
                x = args[0].reshape(-1, args[0].shape[-1]).double()
                tmp = x.shape[0]
                scaler[n] *= seen[n] / (seen[n] + tmp)
                seen[n] += tmp
                scaler[n] += (x.norm(dim=0) ** 2) / seen[n]

            handles.append(m.register_forward_pre_hook(hook))
        with torch.no_grad():
            for s in range(ids.shape[0]):
                model(ids[s : s + 1], use_cache=False)
        for h in handles:
            h.remove()
        for n, m in linears.items():
            metric = m.weight.abs().double() * scaler[n].sqrt()[None, :]
            prune = torch.sort(metric, dim=-1, stable=True).indices[:, : int(m.in_features * sparsity)]
            with torch.no_grad():
                m.weight.scatter_(1, prune, 0.0)
            masks[f"{path}.{i}.{n}"] = m.weight != 0
    return masks


def test_wanda_masks_match_the_original_loop():
    ids = token_ids(8, 32, seed=1)
    reference = _reference_wanda(build("llama", seed=3), ids, 0.5)
    model = build("llama", seed=3)
    StatPruner.from_pretrained(model, config=StatPruneConfig(method="wanda", batch_size=3), device="cpu").prune(
        ids, progress=False
    )
    agree = total = 0
    for t in _targets(model):
        agree += int((reference[t.name] == (t.weight() != 0)).sum())
        total += reference[t.name].numel()
    assert agree / total >= 0.999


def test_sequential_observes_pruned_inputs():
    """Sequential mode prunes q/k/v before o_proj's inputs are observed: the first group's masks agree
    with the one-pass mode, later groups see different inputs."""
    ids = token_ids(6, 24)
    one_pass, sequential = build("llama"), build("llama")
    for model, seq in ((one_pass, False), (sequential, True)):
        cfg = StatPruneConfig(method="wanda", sequential=seq, batch_size=4)
        pruner = StatPruner.from_pretrained(model, config=cfg, device="cpu")
        pruner.prune(ids, progress=False)
        # early stopping inside a block never skips a micro-batch
        assert all(rec["tokens"] == ids.numel() for rec in pruner.report.layers)
    a, b = one_pass.model.layers[0], sequential.model.layers[0]
    for name in ("q_proj", "k_proj", "v_proj"):
        assert torch.equal(getattr(a.self_attn, name).weight, getattr(b.self_attn, name).weight)
    assert not torch.equal(a.self_attn.o_proj.weight, b.self_attn.o_proj.weight)


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_sequential_groups_follow_the_data_flow_every_time(arch):
    """Sequential mode's groups are the block's inputs in order (q/k/v, then o, then gate/up, then down),
    whatever the allocator does: gate/up's input, made after q/k/v's was freed, once reused its memory and
    was grouped with q/k/v by address, in some runs and not others (and so the pruned weights were not
    deterministic). Repeated, since the reuse depends on the allocator's state."""
    from optimum_statprune.engine.observer import input_groups

    model = build(arch)
    path, blocks = find_blocks(model)
    batches = list(iter_batches(token_ids(6, 16), None, 6))
    inputs = capture_block_inputs(model, path, blocks, batches, torch.device("cpu"))
    targets = find_targets(blocks[0], f"{path}.0", StatPruneConfig().targets, StatPruneConfig().ignore)
    expected = [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]
    with torch.no_grad():
        for _ in range(30):
            groups = input_groups(blocks[0], inputs, 0, inputs.hidden, targets)
            assert [[t.name.rsplit(".", 1)[-1] for t in g] for g in groups] == expected


def test_padding_is_excluded_from_statistics(tmp_path):
    """Padded micro-batches give the same masks as unpadded one-sample batches."""
    from tiny_models import tiny_tokenizer

    tok = tiny_tokenizer()
    texts = ["a b c d e f g h", "b c", "c d e f a", "h g f e d c b a a b c d", "e"]
    masks = []
    for bs in (1, 5):
        model = build("llama")
        cfg = StatPruneConfig(method="wanda", batch_size=bs, seqlen=32)
        StatPruner.from_pretrained(model, config=cfg, tokenizer=tok, device="cpu").prune(
            texts, progress=False, allow_short_calibration=True)
        masks.append([t.weight() != 0 for t in _targets(model)])
    agree = sum(int((x == y).sum()) for x, y in zip(*masks, strict=True))
    total = sum(x.numel() for x in masks[0])
    assert agree / total >= 0.999


def test_save_reloads_with_identical_logits_and_manifest(tmp_path):
    model = build("llama")
    pruner = StatPruner.from_pretrained(model, config=StatPruneConfig(method="statprune", sample_tokens=32), device="cpu")
    ids = token_ids(4, 16)
    pruner.prune(ids, progress=False)
    out = tmp_path / "pruned"
    pruner.save_pretrained(out)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["schema_version"] == 2
    assert manifest["config"]["compensation"] == "ec-activation" and manifest["config"]["safety_check"] is True
    assert manifest["config"]["alpha"] == 0.5 and manifest["config"]["activation_stat"] == "second_moment"
    assert manifest["versions"]["torch"] and manifest["versions"]["transformers"]
    cal = manifest["calibration"]
    assert cal["nsamples"] == 4 and cal["seqlen"] == 16 and cal["tokens"] == 64 and len(cal["sha256"]) == 64
    tensors = load_file(out / "model.safetensors")
    assert len(manifest["layers"]) == 14
    for rec in manifest["layers"]:
        assert tensor_sha256(tensors[rec["tensor"]]) == rec["sha256"]
        assert rec["sparsity"] == 0.5 and rec["shape"] == list(tensors[rec["tensor"]].shape)
        comp = rec["compensation"]
        assert comp["kind"] == "ec-activation" and {"error_none", "error_compensated", "applied"} <= set(comp)
        assert comp["applied"] == (comp["error_compensated"] < comp["error_none"])


def test_save_is_atomic_and_refuses_non_empty_dirs(tmp_path, monkeypatch):
    model = build("llama")
    pruner = StatPruner.from_pretrained(model, config=StatPruneConfig(method="magnitude"), device="cpu")
    pruner.prune(progress=False)
    out = tmp_path / "pruned"
    import optimum_statprune.pruner as pruner_module

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pruner_module, "write_manifest", crash)
    with pytest.raises(KeyboardInterrupt):
        pruner.save_pretrained(out)
    assert not out.exists() and list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    pruner.save_pretrained(out)
    with pytest.raises(FileExistsError, match="not empty"):
        pruner.save_pretrained(out)
    pruner.save_pretrained(out, overwrite=True)
    assert (out / MANIFEST_NAME).exists() and sorted(p.name for p in tmp_path.iterdir()) == ["pruned"]


def test_quantize_is_prune_then_save(tmp_path):
    model = build("gpt2")
    pruner = StatPruner.from_pretrained(model, config=StatPruneConfig(method="wanda"), device="cpu")
    pruner.quantize(tmp_path / "out", calibration=token_ids(4, 16))
    assert (tmp_path / "out" / MANIFEST_NAME).exists()
    assert all(r["sparsity"] == 0.5 for r in pruner.report.layers)


def test_targets_and_ignore_select_layers():
    model = build("llama")
    cfg = StatPruneConfig(method="magnitude", targets=[r"mlp\."], ignore=[r"down_proj"])
    pruner = StatPruner.from_pretrained(model, config=cfg, device="cpu")
    pruner.prune(progress=False)
    names = {r["name"].split(".")[-1] for r in pruner.report.layers}
    assert names == {"gate_proj", "up_proj"}
    assert (model.model.layers[0].self_attn.q_proj.weight != 0).all()


def test_unknown_architecture_error_says_how_to_name_blocks():
    class NotATransformer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.ModuleList([torch.nn.Sequential(torch.nn.Linear(4, 4))])
            self.b = torch.nn.ModuleList([torch.nn.Sequential(torch.nn.Linear(4, 4))])

    with pytest.raises(UnsupportedModelError, match="blocks='model.layers'"):
        find_blocks(NotATransformer())
    path, blocks = find_blocks(NotATransformer(), blocks="b")
    assert path == "b" and len(blocks) == 1


def test_activation_methods_need_calibration():
    pruner = StatPruner.from_pretrained(build("llama"), config=StatPruneConfig(method="wanda"), device="cpu")
    with pytest.raises(ValueError, match="needs calibration"):
        pruner.prune(progress=False)


def test_targets_reading_one_tensor_share_one_accumulator():
    from optimum_statprune.engine.capture import BlockInputs
    from optimum_statprune.engine.observer import Observer, observe

    model = build("llama")
    path, blocks = find_blocks(model)
    ids = token_ids(4, 16)
    inputs = capture_block_inputs(model, path, blocks, list(iter_batches(ids, None, 2)), torch.device("cpu"))
    assert isinstance(inputs, BlockInputs)
    targets = find_targets(blocks[0], f"{path}.0")
    observer = Observer(targets, StatPruneConfig(method="wanda"), torch.device("cpu"), 0)
    observe(blocks[0], inputs, 0, inputs.hidden, observer)
    s = {t.name.split(".")[-1]: observer.stats[t.name] for t in targets}
    assert s["q_proj"] is s["k_proj"] is s["v_proj"]
    assert s["gate_proj"] is s["up_proj"]
    distinct = {id(s[n]) for n in ("q_proj", "o_proj", "gate_proj", "down_proj")}
    assert len(distinct) == 4
    assert all(v.count == ids.numel() for v in s.values())
    # the shared statistics are those of the input itself
    x = torch.cat(inputs.hidden)
    normed = blocks[0].input_layernorm(x)
    torch.testing.assert_close(s["q_proj"].channel.sumsq, normed.double().square().sum((0, 1)), rtol=1e-10, atol=1e-10)


def test_owl_redistributes_sparsity_with_the_uniform_total():
    model = build("llama")
    config = StatPruneConfig(method="wanda", owl=True, owl_lambda=0.1)
    pruner = StatPruner.from_pretrained(model, config=config, device="cpu")
    pruner.prune(token_ids(6, 16), progress=False)
    owl = pruner.report.owl
    assert len(owl["ratios"]) == 2 and owl["pruned"] == owl["total"] // 2
    assert max(owl["block_sparsity"]) > 0.5 > min(owl["block_sparsity"])
    zeros = sum(int((t.weight() == 0).sum()) for t in _targets(model))
    assert zeros == owl["pruned"]
    by_block = {}
    for rec in pruner.report.layers:
        by_block.setdefault(rec["name"].split(".")[2], set()).add(round(rec["sparsity"], 2))
    assert len({frozenset(v) for v in by_block.values()}) == 2  # the two blocks got different levels
    assert pruner.manifest()["owl"]["block_sparsity"] == owl["block_sparsity"]


def test_block_safety_check_undoes_a_compensation_that_hurts_the_block():
    ids = token_ids(8, 16, seed=3)
    runs = {}
    for name, extra in (("none", {"compensation": "none"}),
                        ("checked", {"compensation": "ec", "ec_clamp": (3.0, 3.0), "safety_check": True,
                                     "safety_scope": "block"})):
        model = build("llama", seed=5)
        pruner = StatPruner.from_pretrained(model, config=StatPruneConfig(batch_size=4, **extra), device="cpu")
        pruner.prune(ids, progress=False)
        runs[name] = (model, pruner.report.layers)
    model, records = runs["checked"]
    for rec in records:  # multiplying every survivor by 9 cannot help any block
        check = rec["compensation"]["block_check"]
        assert check["error_compensated"] > check["error_none"] and rec["compensation"]["applied"] is False
    for (k, a), b in zip(runs["none"][0].state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_block_safety_check_keeps_the_better_of_the_two():
    ids = token_ids(8, 16, seed=6)
    dense = build("llama", seed=7)
    model = build("llama", seed=7)
    config = StatPruneConfig(compensation="lsq", safety_check=True, safety_scope="block", batch_size=4)
    pruner = StatPruner.from_pretrained(model, config=config, device="cpu")
    pruner.prune(ids, progress=False)
    first = [r for r in pruner.report.layers if r["name"].startswith("model.layers.0.")]
    check = first[0]["compensation"]["block_check"]
    assert all(r["compensation"]["block_check"] == check for r in first)
    assert check["error_compensated"] != check["error_none"]
    with torch.no_grad():  # block 0 sees the same inputs in both models: its error is the kept one's
        out = model(ids[:4], output_hidden_states=True).hidden_states[1]
        ref = dense(ids[:4], output_hidden_states=True).hidden_states[1]
    error = float((out.float() - ref.float()).square().sum())
    assert error == pytest.approx(min(check["error_none"], check["error_compensated"]), rel=1e-4)
    applied = check["error_compensated"] < check["error_none"]
    assert all(r["compensation"]["applied"] is applied for r in first)


def test_sparsegpt_lowers_block_output_error_below_wanda():
    ids = token_ids(16, 32, seed=2)
    dense = build("llama", seed=4)
    with torch.no_grad():
        ref = dense(ids).logits
    errors = {}
    for method in ("wanda", "sparsegpt"):
        model = build("llama", seed=4)
        StatPruner.from_pretrained(model, config=StatPruneConfig(method=method), device="cpu").prune(ids, progress=False)
        with torch.no_grad():
            errors[method] = float((model(ids).logits - ref).square().mean())
    assert errors["sparsegpt"] < errors["wanda"]


def test_config_json_records_pruning_config_not_quantization_config(tmp_path):
    model = build("llama")
    model.config._name_or_path = "someone/tiny-llama"
    pruner = StatPruner.from_pretrained(model, config=StatPruneConfig(method="wanda", pattern="2:4"), device="cpu")
    pruner.prune(token_ids(4, 16), progress=False)
    pruner.save_pretrained(tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "quantization_config" not in saved
    block = saved["pruning_config"]
    assert block["library"] == "optimum-statprune" and block["method"] == "wanda" and block["pattern"] == "2:4"
    assert block["base_model"] == "someone/tiny-llama" and block["manifest"] == MANIFEST_NAME
    assert StatPruner.load_manifest(tmp_path / "out")["config"]["method"] == "wanda"


def test_text_file_calibration_uses_random_windows_capped_to_the_context(tmp_path, caplog):
    from tiny_models import tiny_tokenizer

    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join("abcdefghij"[i % 10] for i in range(4000)))
    model = build("llama")  # max_position_embeddings=256
    cfg = StatPruneConfig(method="wanda", nsamples=3, seqlen=1024)
    pruner = StatPruner.from_pretrained(model, config=cfg, tokenizer=tiny_tokenizer(), device="cpu")
    with caplog.at_level("WARNING"):
        pruner.prune(str(corpus), progress=False)
    assert pruner.calibration_info["nsamples"] == 3 and pruner.calibration_info["seqlen"] == 256
    assert any("256" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="pinned host activations need a GPU"))])
def test_activations_kept_on_the_host_give_the_same_pruned_weights(device, monkeypatch):
    """``activations="host"`` keeps the calibration hidden states in host memory between blocks (pinned
    when the blocks run on a GPU) and copies each batch back for the block: the pruned weights are those of
    ``activations="device"`` bit for bit, and the states really were on the host."""
    from optimum_statprune.engine import loop

    seen = []
    capture = loop.capture_block_inputs
    monkeypatch.setattr(loop, "capture_block_inputs", lambda *a, **k: seen.append(capture(*a, **k)) or seen[-1])
    cfg = StatPruneConfig(method="statprune", sample_tokens=32)
    weights = {}
    for placement in ("device", "host"):
        pruner = StatPruner.from_pretrained(build("llama"), config=cfg, device=device)
        pruner.prune(token_ids(6, 16), progress=False, activations=placement)
        weights[placement] = {t.name: t.weight().detach().cpu().clone() for t in _targets(pruner.model)}
    device_run, host_run = seen
    assert not device_run.on_host and all(h.device.type == device for h in device_run.hidden)
    assert host_run.on_host and all(h.device.type == "cpu" for h in host_run.hidden)
    assert all(h.is_pinned() for h in host_run.hidden) == (device == "cuda")
    assert weights["device"].keys() == weights["host"].keys()
    assert all(torch.equal(weights["device"][k], weights["host"][k]) for k in weights["device"])

"""The prune step's guards and decisions, on tiny models: non-finite weights and block outputs, targets that
select nothing, where a compensation does not run and why, and SparseGPT's options reaching the solver."""

from __future__ import annotations

import json

import pytest
import torch
from tiny_models import build, token_ids

from optimum_statprune import StatPruneConfig, StatPruner
from optimum_statprune.engine.loop import NonFiniteError, NoTargetsError
from optimum_statprune.engine.targets import find_blocks
from optimum_statprune.sharing.manifest import MANIFEST_NAME

METHODS = ("magnitude", "wanda", "ria", "cvr", "statprune", "sparsegpt")


def _prune(model, **config):
    pruner = StatPruner.from_pretrained(model, config=StatPruneConfig(sample_tokens=32, **config), device="cpu")
    pruner.prune(token_ids(4, 16), progress=False)
    return pruner.report


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


# ---------------------------------------------------------------------------------------------- non-finite
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_weight_stops_every_method_naming_it(method, bad):
    model = build("llama")
    _, blocks = find_blocks(model)
    with torch.no_grad():
        blocks[1].mlp.up_proj.weight[3, 5] = bad
    with pytest.raises(NonFiniteError, match=r"model\.layers\.1\.mlp\.up_proj: the weight before pruning holds 1 non-finite"):
        _prune(model, method=method)
    assert issubclass(NonFiniteError, ValueError)


@pytest.mark.parametrize("method", ["wanda", "statprune", "sparsegpt"])
def test_a_block_whose_outputs_are_not_finite_stops_the_run_naming_it(method):
    """Finite weights can still give non-finite outputs (an overflow): the next block would be calibrated
    on them, so the run stops at the block that produced them."""
    model = build("llama")
    _, blocks = find_blocks(model)

    def poison(module, args, kwargs, output):
        out = output[0] if isinstance(output, tuple) else output
        out = out.clone()
        out[0, 0, 0] = float("inf")
        return (out, *output[1:]) if isinstance(output, tuple) else out

    blocks[0].register_forward_hook(poison, with_kwargs=True)
    before = {k: v.clone() for k, v in blocks[1].state_dict().items()}
    with pytest.raises(NonFiniteError, match=r"the output of block model\.layers\.0 \(calibration batch 0\)"):
        _prune(model, method=method)
    # read once the next block was observed, but before any of its weights changed
    assert all(torch.equal(v, before[k]) for k, v in blocks[1].state_dict().items())


def test_records_say_what_was_checked():
    report = _prune(build("llama"), method="wanda")
    by_block = {0: [], 1: []}
    for rec in report.layers:
        by_block[int(rec["name"].split(".")[2])].append(rec["finite_checked"])
    assert by_block[0] and all(c == ["weight", "block_output"] for c in by_block[0])
    # the last block's outputs feed no block and are not computed
    assert by_block[1] and all(c == ["weight"] for c in by_block[1])
    assert report.finite_checked_blocks == [0]
    # without calibration data there are no block outputs: only the weights are checked
    magnitude = _prune(build("llama"), method="magnitude")
    assert all(rec["finite_checked"] == ["weight"] for rec in magnitude.layers)
    assert magnitude.finite_checked_blocks == []


# ---------------------------------------------------------------------------------------------- targets
@pytest.mark.parametrize(
    "selection", [{"targets": ["nomatch"]}, {"ignore": [".*"]}, {"targets": ["q_proj"], "ignore": ["self_attn"]}]
)
def test_targets_that_select_nothing_are_refused_before_any_block_is_pruned(selection):
    model = build("llama")
    before = _state(model)
    with pytest.raises(NoTargetsError) as info:
        _prune(model, method="wanda", **selection)
    msg = str(info.value)
    assert repr(selection.get("targets")) in msg and "model.layers.0.self_attn.q_proj" in msg
    assert issubclass(NoTargetsError, ValueError)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_targets_in_one_block_only_are_fine():
    """A pattern may name a single block: block 0 holding no target is not an error."""
    report = _prune(build("llama"), method="magnitude", targets=[r"layers\.1\.mlp"])
    assert {r["name"] for r in report.layers} == {f"model.layers.1.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")}


def test_streaming_refuses_targets_that_select_nothing(tmp_path):
    src = tmp_path / "src"
    build("llama").save_pretrained(src)
    pruner = StatPruner.from_pretrained(src, config=StatPruneConfig(method="magnitude", targets=["nomatch"]), device="cpu")
    with pytest.raises(NoTargetsError, match="nomatch"):
        pruner.prune(None, output_dir=tmp_path / "out", progress=False)
    assert not list(tmp_path.glob("out/*.safetensors"))  # nothing written


# ---------------------------------------------------------------------------------------------- compensation
def test_bias_compensation_on_a_layer_without_bias_records_why():
    report = _prune(build("llama"), method="wanda", compensation="bias")
    comp = {r["compensation"]["kind"]: r["compensation"] for r in report.layers}
    assert comp == {"bias": {"kind": "bias", "applied": False, "reason": "layer has no bias (add_bias is off)"}}


def test_bias_compensation_where_the_layer_has_a_bias_is_applied():
    model = build("opt")  # OPT's linears have biases
    before = _state(model)
    report = _prune(model, method="wanda", compensation="bias")
    applied = [r for r in report.layers if r["compensation"]["applied"]]
    assert applied and all("reason" not in r["compensation"] for r in applied)
    name = applied[0]["name"]
    assert not torch.equal(model.state_dict()[f"{name}.bias"], before[f"{name}.bias"])


def test_magnitude_with_energy_compensation_compensates_without_calibration_data():
    """EC reads only the weights: magnitude + EC needs no data and is applied (it used to be dropped
    silently because no statistics were collected)."""
    model = build("llama")
    pruner = StatPruner.from_pretrained(model, config=StatPruneConfig(method="magnitude", compensation="ec"), device="cpu")
    pruner.prune(None, progress=False)
    recs = pruner.report.layers
    assert all(r["compensation"] == {"kind": "ec", "applied": True} for r in recs)
    plain = build("llama")
    StatPruner.from_pretrained(plain, config=StatPruneConfig(method="magnitude"), device="cpu").prune(None, progress=False)
    q, q_plain = model.model.layers[0].self_attn.q_proj.weight, plain.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(q != 0, q_plain != 0)  # same mask
    assert (q.abs() >= q_plain.abs()).all() and not torch.equal(q, q_plain)  # EC factors clamp to >= 1


# ---------------------------------------------------------------------------------------------- sparsegpt
@pytest.mark.parametrize(("allocation", "sweep"), [("even", "columns"), ("lookahead", "solve")])
def test_sparsegpt_options_reach_the_solver(monkeypatch, allocation, sweep):
    import optimum_statprune.tensor_math.sparsegpt as solver

    seen = []
    real = solver.sparsegpt_prune

    def spy(*args, **kwargs):
        seen.append((kwargs["allocation"], kwargs["sweep"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(solver, "sparsegpt_prune", spy)
    report = _prune(build("llama"), method="sparsegpt", sparsegpt_allocation=allocation, sparsegpt_sweep=sweep)
    assert seen and set(seen) == {(allocation, sweep)}
    assert all(r["sparsity"] == 0.5 for r in report.layers)


def test_manifest_records_the_resolved_sparsity_of_an_nm_pattern(tmp_path):
    src = tmp_path / "src"
    build("llama").save_pretrained(src)
    out = tmp_path / "out"
    StatPruner.from_pretrained(src, config=StatPruneConfig(method="magnitude", pattern="1:4"), device="cpu").prune(
        None, output_dir=out, progress=False)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["config"]["sparsity"] == 0.75 and manifest["config"]["pattern"] == "1:4"
    assert manifest["summary"]["sparsity"] == 0.75


# ---------------------------------------------------------------------------------------------- OWL
def test_owl_with_magnitude_needs_calibration_and_allocates_per_block():
    """OWL ranks blocks by outlier Wanda scores whatever the method: without calibration data it used to
    see no activations and fall back to uniform sparsity silently."""
    config = StatPruneConfig(method="magnitude", owl=True, owl_lambda=0.2, owl_threshold=2.0)
    assert config.statistics == frozenset() and config.needs_activations
    with pytest.raises(ValueError, match="needs calibration"):
        StatPruner.from_pretrained(build("llama"), config=config, device="cpu").prune(progress=False)
    pruner = StatPruner.from_pretrained(build("llama"), config=config, device="cpu")
    pruner.prune(token_ids(4, 16), progress=False)
    ratios = pruner.report.owl["ratios"]
    assert any(r > 0 for r in ratios) and len(set(pruner.report.owl["block_sparsity"])) > 1
    assert all(r["tokens"] == 0 and "fallback" not in r for r in pruner.report.layers)  # magnitude observes nothing


@pytest.mark.parametrize("where", ["model.norm.weight", "model.layers.1.post_attention_layernorm.weight"])
@pytest.mark.parametrize("streamed", [True, False])
def test_float16_that_would_overflow_is_refused_naming_the_tensor(tmp_path, where, streamed):
    """A weight beyond float16's 65504, asked for as float16, would be written as Inf (outside the pruned
    linears nothing else checks it): the run stops before anything is written, naming the tensor."""
    model = build("llama")
    with torch.no_grad():
        dict(model.named_parameters())[where][3] = 1e5
    src = tmp_path / "src"
    model.save_pretrained(src)
    pruner = StatPruner.from_pretrained(src, config=StatPruneConfig(method="wanda"), device="cpu", dtype="float16")
    out = tmp_path / "out"
    with pytest.raises(NonFiniteError, match=where.replace(".", r"\.")):
        if streamed:
            pruner.prune(token_ids(4, 16), output_dir=out, progress=False)
        else:
            pruner.prune(token_ids(4, 16), progress=False)
    assert not out.exists()
    # in float32 (no cast) the same checkpoint prunes; a partial with finished blocks of the float16 run is
    # only discarded when asked (a partial with none is discarded anyway: nothing to lose)
    StatPruner.from_pretrained(src, config=StatPruneConfig(method="wanda"), device="cpu").prune(
        token_ids(4, 16), output_dir=out, progress=False, overwrite=True)
    assert (out / MANIFEST_NAME).exists()


def test_block_reads_fill_records_and_name_the_first_non_finite_weight():
    """The per-block reads give each record the sparsity a per-weight read gives, and a weight that is not
    finite after pruning stops the run naming it, as ``check_finite`` would."""
    from optimum_statprune.engine.prune_step import BlockReads

    reads = BlockReads()
    records = [{}, {}]
    masks = [torch.tensor([[True, False, False], [True, True, False]]), torch.ones(2, 2, dtype=torch.bool)]
    for record, mask in zip(records, masks, strict=True):
        reads.sparsity(record, mask)
    reads.check_finite(torch.ones(3), "a: the weight after pruning")
    reads.finish()
    assert records == [{"sparsity": 1.0 - 3 / 6}, {"sparsity": 0.0}]

    reads.check_finite(torch.ones(3), "a: the weight after pruning")
    reads.check_finite(torch.tensor([1.0, float("nan"), float("inf")]), "b: the weight after pruning")
    with pytest.raises(NonFiniteError, match=r"^b: the weight after pruning holds 2 non-finite value\(s\)"):
        reads.finish()


def test_a_non_finite_weight_stops_the_block_before_any_weight_changes():
    """Every weight of an input group is checked before the first is pruned."""
    model = build("llama")
    _, blocks = find_blocks(model)
    with torch.no_grad():
        blocks[0].mlp.up_proj.weight[0, 0] = float("nan")  # gate_proj, pruned before it, reads the same input
    before = blocks[0].mlp.gate_proj.weight.detach().clone()
    with pytest.raises(NonFiniteError, match=r"mlp\.up_proj: the weight before pruning holds 1 non-finite"):
        _prune(model, method="wanda")
    assert torch.equal(blocks[0].mlp.gate_proj.weight, before)

"""Perplexity against a hand computation, sparsity report, lm-eval bridge's missing-package message."""

from __future__ import annotations

import math
import sys

import pytest
import torch

from optimum_statprune.evaluate import lm_eval_bridge, perplexity, sparsity_report, targeted_weights


def tiny_llama(tie: bool = False):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=101,
        max_position_embeddings=64,
        tie_word_embeddings=tie,
    )
    model = LlamaForCausalLM(config)
    with torch.no_grad():  # larger weights than the init so the model is far from uniform
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.2)
    return model.eval()


def hand_perplexity(model, windows: torch.Tensor) -> float:
    """exp(mean NLL) with an explicit float64 log-softmax, one window at a time."""
    total, count = 0.0, 0
    with torch.no_grad():
        for w in windows:
            logits = model(input_ids=w[None]).logits[0].double()  # [L, V]
            logp = logits - torch.logsumexp(logits, dim=-1, keepdim=True)
            targets = w[1:]
            nll = -logp[torch.arange(len(targets)), targets]  # position t predicts token t+1
            total += nll.sum().item()
            count += len(targets)
    return math.exp(total / count)


def test_perplexity_matches_hand_computation():
    model = tiny_llama()
    g = torch.Generator().manual_seed(1)
    windows = torch.randint(0, 101, (5, 17), generator=g)
    expected = hand_perplexity(model, windows)
    assert expected > 101  # far from uniform: a wrong shift or a wrong mean would show
    for batch_size in (1, 2, 5):
        got = perplexity(model, windows, batch_size=batch_size, disable_progress=True)
        assert got == pytest.approx(expected, rel=1e-5)
    assert perplexity(model, windows, device="cpu", disable_progress=True) == pytest.approx(
        expected, rel=1e-5
    )


def test_perplexity_windows_are_independent():
    """Scoring windows together equals scoring each alone (no context carried between windows)."""
    model = tiny_llama()
    windows = torch.randint(0, 101, (4, 9), generator=torch.Generator().manual_seed(2))
    per_window = [math.log(perplexity(model, w[None], disable_progress=True)) for w in windows]
    together = perplexity(model, windows, batch_size=3, disable_progress=True)
    assert together == pytest.approx(math.exp(sum(per_window) / len(per_window)), rel=1e-6)


class OneOfTwoRanks:
    """Rank ``rank`` of two: the real share arithmetic, and an all-reduce that adds the other rank's sums
    (computed here by hand) so one rank's call can be checked without a process group."""

    def __init__(self, rank: int, other_sums: tuple[float, int]):
        from optimum_statprune.engine.distributed import DistContext

        self.ctx = DistContext(rank=rank, world_size=2)
        self.other = list(other_sums)
        self.active, self.is_main, self.part = True, rank == 0, self.ctx.part

    def all_sum(self, value: float) -> float:
        return value + self.other.pop(0)


def test_perplexity_scores_only_its_share_of_the_windows_and_adds_the_others():
    """5 windows over two ranks: rank 0 scores windows 0-2, rank 1 windows 3-4 (checked by counting what
    reaches the model), and with the other rank's sums added both return the one-process perplexity."""
    model = tiny_llama()
    windows = torch.randint(0, 101, (5, 11), generator=torch.Generator().manual_seed(3))
    seen: list[torch.Tensor] = []
    handle = model.model.embed_tokens.register_forward_pre_hook(lambda m, args: seen.append(args[0].clone()))

    def sums(part: torch.Tensor) -> tuple[float, int]:
        return math.log(hand_perplexity(model, part)) * part.shape[0] * 10, part.shape[0] * 10

    try:
        for rank, mine, other in ((0, slice(0, 3), slice(3, 5)), (1, slice(3, 5), slice(0, 3))):
            other_sums = sums(windows[other])
            seen.clear()
            got = perplexity(model, windows, batch_size=2, disable_progress=True, dist=OneOfTwoRanks(rank, other_sums))
            assert torch.equal(torch.cat(seen), windows[mine])
            assert got == pytest.approx(hand_perplexity(model, windows), rel=1e-5)
    finally:
        handle.remove()


def test_perplexity_restores_training_mode_and_checks_input():
    model = tiny_llama().train()
    windows = torch.randint(0, 101, (2, 8), generator=torch.Generator().manual_seed(3))
    perplexity(model, windows, disable_progress=True)
    assert model.training
    with pytest.raises(ValueError, match="2-D"):
        perplexity(model, windows[0])
    with pytest.raises(ValueError, match=">= 2 tokens"):
        perplexity(model, windows[:, :1])
    with pytest.raises(ValueError, match="integer"):
        perplexity(model, windows.float())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_perplexity_on_gpu_matches_cpu():
    model = tiny_llama()
    windows = torch.randint(0, 101, (3, 16), generator=torch.Generator().manual_seed(4))
    cpu = perplexity(model, windows, disable_progress=True)
    gpu = perplexity(model.cuda(), windows, disable_progress=True)
    assert gpu == pytest.approx(cpu, rel=1e-4)


def test_sparsity_report_counts_known_zeros():
    model = tiny_llama()
    layers = model.model.layers
    with torch.no_grad():
        layers[0].self_attn.q_proj.weight[:, :8] = 0  # 32 x 8 = 256 zeros
        layers[1].mlp.down_proj.weight.zero_()  # 32 x 64 = 2048 zeros
        model.lm_head.weight.zero_()  # never counted
    report = sparsity_report(model)

    names = set(report["layers"])
    assert "lm_head" not in names and not any("embed" in n for n in names)
    assert len(names) == 2 * 7  # q, k, v, o, gate, up, down per block
    q = report["layers"]["model.layers.0.self_attn.q_proj"]
    assert (q["zeros"], q["total"], q["sparsity"]) == (256, 32 * 32, 0.25)
    down = report["layers"]["model.layers.1.mlp.down_proj"]
    assert (down["zeros"], down["sparsity"]) == (2048, 1.0)

    expected_total = sum(
        m.weight.numel() for layer in layers for m in layer.modules() if isinstance(m, torch.nn.Linear)
    )
    assert report["total"] == expected_total
    assert report["zeros"] == 256 + 2048
    assert report["sparsity"] == pytest.approx((256 + 2048) / expected_total)


def test_sparsity_report_tied_head_and_conv1d():
    from transformers import GPT2Config, GPT2LMHeadModel

    tied = tiny_llama(tie=True)
    assert "lm_head" not in targeted_weights(tied)

    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=50, n_positions=32))
    with torch.no_grad():
        gpt2.transformer.h[0].attn.c_attn.weight[:4] = 0  # Conv1D weight is [in, out] = [32, 96]
    report = sparsity_report(gpt2)
    assert set(report["layers"]) == {
        "transformer.h.0.attn.c_attn",
        "transformer.h.0.attn.c_proj",
        "transformer.h.0.mlp.c_fc",
        "transformer.h.0.mlp.c_proj",
    }
    assert report["layers"]["transformer.h.0.attn.c_attn"]["zeros"] == 4 * 96


def test_lm_eval_bridge_missing_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    monkeypatch.setitem(sys.modules, "lm_eval.models.huggingface", None)
    with pytest.raises(ImportError, match="pip install lm-eval"):
        lm_eval_bridge(torch.nn.Linear(2, 2), None, ["hellaswag"])


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_eval_sparsity_equals_the_manifests_on_moe(tmp_path, arch):
    """eval and the manifest count the same weights: no routers, every fused expert once per expert and
    projection (the old report counted the routers' linears and missed the fused experts)."""
    import json

    from tiny_models import build, token_ids

    from optimum_statprune import StatPruneConfig, StatPruner
    from optimum_statprune.sharing.manifest import MANIFEST_NAME

    model = build(arch)
    # 0.59 prunes a different share of 64- and 128-wide rows (37/64, 75/128): the total depends on which
    # weights are counted
    pruner = StatPruner.from_pretrained(model, config=StatPruneConfig(method="wanda", sparsity=0.59), device="cpu")
    pruner.prune(token_ids(4, 16), progress=False)
    pruner.save_pretrained(tmp_path)
    manifest = json.loads((tmp_path / MANIFEST_NAME).read_text())
    report = sparsity_report(model)
    assert set(report["layers"]) == {rec["name"] for rec in manifest["layers"]}
    assert not any(name.endswith((".gate", ".shared_expert_gate")) for name in report["layers"])
    assert any(".experts." in name for name in report["layers"])
    assert report["total"] == manifest["summary"]["weights"]
    assert report["sparsity"] == pytest.approx(manifest["summary"]["sparsity"], abs=1e-12)
    # per weight too: the zeros counted are the mask's pruned weights
    for rec in manifest["layers"]:
        assert report["layers"][rec["name"]]["sparsity"] == pytest.approx(rec["sparsity"], abs=1e-12)


def test_sparsity_report_takes_the_configs_targets():
    model = tiny_llama()
    report = sparsity_report(model, targets=["mlp"], ignore=[r"layers\.1\."])
    assert set(report["layers"]) == {f"model.layers.0.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")}

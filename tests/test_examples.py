"""Every script in examples/ runs here against a tiny model, so an example cannot rot.

Each example is a ``main(argv)``; the tests import it from its file and call it with a tiny Llama built
from a config, a small text file and (for the push) the fake Hub on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import random
from pathlib import Path
from types import ModuleType

import pytest
import torch
from fake_hub import USER, VALID_TOKEN, fake_hub_session
from tiny_models import save_tiny_llama

from optimum_statprune.sharing.manifest import MANIFEST_NAME

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_example_is_tested():
    tested = {"prune_eval_push", "finetune_pruned"}
    assert {p.stem for p in EXAMPLES.glob("*.py")} == tested


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("examples") / "tiny-llama")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("text") / "train.txt"
    path.write_text(" ".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(4000)), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def pruned(dense_dir, corpus, tmp_path_factory) -> tuple[Path, str]:
    """The prune_eval_push example run once: (its output folder, what it printed)."""
    out = tmp_path_factory.mktemp("pruned") / "tiny-2of4"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        load_example("prune_eval_push").main(
            ["--model", str(dense_dir), "--calibration", str(corpus), "--eval", str(corpus), "--eval-windows", "2",
             "--method", "wanda", "--pattern", "2:4", "--nsamples", "4", "--seqlen", "32", "--device", "cpu", "--output", str(out)]
        )  # fmt: skip
    return out, printed.getvalue()


@pytest.fixture(scope="module")
def pruned_dir(pruned) -> Path:
    return pruned[0]


def test_prune_eval_push_saves_verifies_and_prints_the_card(pruned):
    folder, out = pruned
    manifest = json.loads((folder / MANIFEST_NAME).read_text())
    assert manifest["config"]["pattern"] == "2:4"
    assert manifest["evaluation"]["perplexity"]["windows"] == 2
    assert "perplexity: dense" in out and "OK" in out
    assert "2:4" in out  # the model card, printed because no --repo-id was given


def test_prune_eval_push_pushes_to_the_hub(dense_dir, corpus, tmp_path, monkeypatch, capsys):
    with fake_hub_session(monkeypatch, tmp_path) as hub:
        monkeypatch.setenv("HF_TOKEN", VALID_TOKEN)
        repo = f"{USER}/tiny-magnitude"
        load_example("prune_eval_push").main(
            ["--model", str(dense_dir), "--calibration", str(corpus), "--method", "magnitude", "--seqlen", "32",
             "--device", "cpu", "--output", str(tmp_path / "out"), "--repo-id", repo]
        )  # fmt: skip
        assert MANIFEST_NAME in hub.files(repo) and "README.md" in hub.files(repo)
    assert "pushed:" in capsys.readouterr().out


@pytest.mark.parametrize("lora", [False, True])
def test_finetune_pruned_keeps_the_zeros(pruned_dir, corpus, tmp_path, lora):
    if lora:
        pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    out = tmp_path / "tuned"
    argv = [str(pruned_dir), "--data", str(corpus), "--output", str(out), "--steps", "3", "--lr", "1e-3", "--seqlen", "32",
            "--batch-size", "2"] + (["--lora"] if lora else [])  # fmt: skip
    load_example("finetune_pruned").main(argv)  # raises if verify finds a pruned weight that came back
    before = AutoModelForCausalLM.from_pretrained(pruned_dir).state_dict()
    after = AutoModelForCausalLM.from_pretrained(out).state_dict()
    key = "model.layers.0.mlp.down_proj.weight"
    assert torch.equal(after[key] == 0, before[key] == 0) and not torch.equal(after[key], before[key])

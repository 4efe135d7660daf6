"""Fine-tuning a pruned model: Trainer callback, plain PyTorch hook, LoRA merge + re-mask."""

from __future__ import annotations

import pytest
import torch
from tiny_models import build, token_ids
from transformers import AutoModelForCausalLM, Trainer, TrainingArguments

from optimum_statprune import StatPruneConfig, StatPruner
from optimum_statprune.sharing.manifest import read_manifest
from optimum_statprune.sharing.verify import verify
from optimum_statprune.training import (
    SparsityMasks,
    SparsityPreservingCallback,
    canonical_name,
    remask_merged_lora,
)


class _Cycles(torch.utils.data.Dataset):
    """Token sequences that repeat a short cycle: easy to learn, so a few steps lower the loss."""

    def __init__(self, n: int = 16, t: int = 24):
        g = torch.Generator().manual_seed(0)
        cycle = torch.randint(3, 40, (6,), generator=g)
        self.rows = [torch.roll(cycle, int(s)).repeat(t // 6 + 1)[:t] for s in torch.randint(0, 6, (n,), generator=g)]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.rows[i], "labels": self.rows[i]}


@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory):
    model = build("llama")
    pruner = StatPruner.from_pretrained(model, config=StatPruneConfig(method="wanda", pattern="2:4"), device="cpu")
    pruner.prune(token_ids(), progress=False)
    return pruner.save_pretrained(tmp_path_factory.mktemp("train") / "pruned")


def _loss(model, data) -> float:
    batch = torch.stack([data[i]["input_ids"] for i in range(len(data))])
    model.eval()
    with torch.no_grad():
        return float(model(input_ids=batch, labels=batch).loss)


def _train(model, tmp_path, callbacks, steps: int = 5, lr: float = 1e-2):
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"), max_steps=steps, per_device_train_batch_size=8, learning_rate=lr,
        weight_decay=0.01, report_to=[], save_strategy="no", logging_steps=1, use_cpu=True,
        disable_tqdm=True, seed=0, lr_scheduler_type="constant",
    )
    trainer = Trainer(model=model, args=args, train_dataset=_Cycles(), callbacks=callbacks)
    trainer.train()
    return trainer


def test_canonical_names_see_through_peft():
    assert canonical_name("base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight") == (
        "model.layers.0.self_attn.q_proj.weight"
    )
    assert canonical_name("model.layers.0.mlp.down_proj.weight") == "model.layers.0.mlp.down_proj.weight"


@pytest.mark.parametrize("source,mask_gradients", [("manifest", True), ("zeros", False)])
def test_trainer_keeps_exact_sparsity_and_learns(pruned_dir, tmp_path, source, mask_gradients):
    model = AutoModelForCausalLM.from_pretrained(pruned_dir)
    data = _Cycles()
    before = _loss(model, data)
    manifest = pruned_dir if source == "manifest" else None
    callback = SparsityPreservingCallback(manifest=manifest, mask_gradients=mask_gradients)
    _train(model, tmp_path, [callback])
    assert _loss(model, data) < before - 0.05
    masks = callback.masks
    assert set(masks.masks) == {r["tensor"] for r in read_manifest(pruned_dir)["layers"]}
    assert masks.sparsity == pytest.approx(0.5)
    assert masks.violations(model) == {}
    # the weights did change, only the zeros stayed: a fresh save passes the original manifest's checks
    tuned = tmp_path / "tuned"
    model.save_pretrained(tuned)
    assert verify(tuned, manifest=pruned_dir, hashes=False).ok
    assert not verify(tuned, manifest=pruned_dir).ok


def test_without_the_callback_training_breaks_sparsity(pruned_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(pruned_dir)
    masks = SparsityMasks.from_model(model, manifest=pruned_dir)
    _train(model, tmp_path, [], steps=2)
    assert len(masks.violations(model)) == len(masks)


def test_plain_pytorch_loop_with_attach(pruned_dir):
    model = AutoModelForCausalLM.from_pretrained(pruned_dir)
    masks = SparsityMasks.from_model(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    handle = masks.attach(optimizer, model)
    batch = torch.stack([row["input_ids"] for row in _Cycles(8)])
    for _ in range(3):
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert masks.violations(model) == {}
    handle.remove()
    model(input_ids=batch, labels=batch).loss.backward()
    optimizer.step()
    assert masks.violations(model)  # detached: the next step fills the zeros


def test_unpruned_model_is_refused():
    with pytest.raises(ValueError, match="is this the pruned model"):
        SparsityMasks.from_model(build("llama"))


@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")  # peft vs transformers 5
def test_lora_train_merge_and_remask_keeps_exact_sparsity(pruned_dir, tmp_path):
    peft = pytest.importorskip("peft")
    model = AutoModelForCausalLM.from_pretrained(pruned_dir)
    masks = SparsityMasks.from_model(model, manifest=pruned_dir)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], lora_dropout=0.0)
    lora = peft.get_peft_model(model, config)
    data = _Cycles()
    before = _loss(lora, data)
    callback = SparsityPreservingCallback(masks=masks)  # the base is frozen: a no-op, kept for safety
    _train(lora, tmp_path, [callback], lr=3e-2)
    after = _loss(lora, data)
    assert after < before - 0.05
    assert masks.violations(lora) == {}  # the adapter is separate: the base is still exactly sparse

    merged = lora.merge_and_unload()
    broken = masks.violations(merged)
    assert broken and all(".q_proj." in k or ".v_proj." in k or ".down_proj." in k for k in broken)
    stats = remask_merged_lora(merged, masks)
    assert masks.violations(merged) == {}
    assert set(stats["removed"]) == set(broken) and 0 < stats["removed_total"] < 1
    # what re-masking costs: the merged model is close to, but not exactly, base + adapter
    assert _loss(merged, data) == pytest.approx(after, abs=0.5)
    merged.save_pretrained(tmp_path / "merged")
    assert verify(tmp_path / "merged", manifest=pruned_dir, hashes=False).ok

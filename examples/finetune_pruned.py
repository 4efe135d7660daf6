"""Fine-tune a pruned model and keep its sparsity exact: full fine-tuning, or LoRA then merge + re-mask.

    python examples/finetune_pruned.py smollm2-2of4 --data train.txt --output smollm2-2of4-tuned
    python examples/finetune_pruned.py your-name/smollm2-135m-2of4 --data train.txt --output tuned --lora

The pruned model is a local directory or a Hub repo with its pruning_manifest.json. --lora needs
`pip install peft`. At the end the saved model is checked against the original manifest's zeros.
"""

from __future__ import annotations

import argparse

from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

from optimum_statprune.data.texts import evaluation_windows, load_texts
from optimum_statprune.sharing.verify import load_manifest, verify
from optimum_statprune.training import SparsityMasks, SparsityPreservingCallback, remask_merged_lora


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("pruned", help="directory or Hub id of a model pruned by optimum-statprune")
    p.add_argument("--data", required=True, help="training text: a file, directory or preset")
    p.add_argument("--output", required=True)
    p.add_argument("--lora", action="store_true", help="train a LoRA adapter, then merge it and re-mask")
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=4)
    args = p.parse_args(argv)

    manifest = load_manifest(args.pruned)
    model = AutoModelForCausalLM.from_pretrained(args.pruned)
    tokenizer = AutoTokenizer.from_pretrained(args.pruned)
    blocks = evaluation_windows(load_texts(args.data), tokenizer, args.seqlen)  # non-overlapping windows
    dataset = [{"input_ids": ids, "labels": ids} for ids in blocks]
    masks = SparsityMasks.from_model(model, manifest=manifest)  # before any wrapping: which weights are zero

    if args.lora:
        import peft

        model = peft.get_peft_model(model, peft.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    training = TrainingArguments(
        output_dir=args.output, max_steps=args.steps, learning_rate=args.lr, per_device_train_batch_size=args.batch_size,
        logging_steps=10, save_strategy="no", report_to=[],
    )
    trainer = Trainer(model=model, args=training, train_dataset=dataset, callbacks=[SparsityPreservingCallback(masks=masks)])
    trainer.train()

    if args.lora:
        model = model.merge_and_unload()  # adds the dense LoRA delta everywhere, pruned positions included
        stats = remask_merged_lora(model, masks)
        print(f"re-masked the merged model: dropped {stats['removed_total']:.3f} of the weights' norm")
    model.save_pretrained(args.output)
    tokenizer.save_pretrained(args.output)
    report = verify(args.output, manifest=manifest, hashes=False)  # the zeros, not the (changed) hashes
    print(report)
    report.raise_if_failed()


if __name__ == "__main__":
    main()

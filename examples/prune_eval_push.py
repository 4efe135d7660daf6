"""Prune a causal LM, measure perplexity before and after, save, verify, and push it to the Hub.

    python examples/prune_eval_push.py --model HuggingFaceTB/SmolLM2-135M-Instruct \
        --calibration c4 --eval wikitext2 --eval-split test --pattern 2:4 \
        --output smollm2-2of4 --repo-id your-name/smollm2-135m-2of4

Calibration and evaluation text can be local files (.txt, .jsonl, ...) as well as dataset presets.
Without --repo-id nothing is uploaded: the model card is printed instead. Log in first
(`huggingface-cli login` or HF_TOKEN) to push.
"""

from __future__ import annotations

import argparse

from optimum_statprune import StatPruneConfig, StatPruner
from optimum_statprune.data.texts import calibration_windows, evaluation_windows, load_texts
from optimum_statprune.evaluate import perplexity
from optimum_statprune.sharing.hub import model_card, push_to_hub
from optimum_statprune.sharing.manifest import read_manifest, write_manifest
from optimum_statprune.sharing.verify import verify


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="Hub id or local directory of the dense model")
    p.add_argument("--calibration", required=True, help="calibration text: a file, directory or preset")
    p.add_argument("--eval", help="evaluation text for perplexity (same forms)")
    p.add_argument("--eval-split", help="dataset split of --eval (e.g. test)")
    p.add_argument("--eval-windows", type=int, default=64)
    p.add_argument("--method", default="statprune")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--pattern", default="unstructured", help="unstructured, 2:4, 4:8, ...")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--device", help="compute device for pruning (default: cuda if available)")
    p.add_argument("--output", required=True, help="directory to save the pruned model in")
    p.add_argument("--repo-id", help="push to this Hub repo (created if missing)")
    p.add_argument("--private", action="store_true")
    args = p.parse_args(argv)

    config = StatPruneConfig(
        method=args.method, sparsity=args.sparsity, pattern=args.pattern, nsamples=args.nsamples, seqlen=args.seqlen
    )
    pruner = StatPruner.from_pretrained(args.model, config=config, device=args.device)
    model, tokenizer = pruner.model, pruner.tokenizer
    calibration = calibration_windows(load_texts(args.calibration), tokenizer, config.nsamples, config.seqlen, config.seed)
    windows = None
    if args.eval:
        windows = evaluation_windows(load_texts(args.eval, split=args.eval_split), tokenizer, config.seqlen, args.eval_windows)
    dense = perplexity(model, windows) if windows is not None else None

    pruner.prune(calibration)
    folder = pruner.save_pretrained(args.output, overwrite=True)

    if windows is not None:
        pruned = perplexity(model, windows)
        print(f"perplexity: dense {dense:.2f} -> pruned {pruned:.2f} on {windows.shape[0]} x {windows.shape[1]} tokens")
        manifest = read_manifest(folder)  # the model card shows this section
        manifest["evaluation"] = {
            "perplexity": {
                "data": args.eval, "split": args.eval_split, "windows": int(windows.shape[0]),
                "seqlen": int(windows.shape[1]), "dense": dense, "pruned": pruned,
            }
        }
        write_manifest(folder, manifest)

    report = verify(folder)  # hashes, sparsity and N:M groups of what was written
    print(report)
    report.raise_if_failed()
    if args.repo_id:
        info = push_to_hub(folder, args.repo_id, private=args.private)
        print(f"pushed: {info.commit_url}")
    else:
        print(model_card(folder))


if __name__ == "__main__":
    main()

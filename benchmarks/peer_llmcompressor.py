"""Peer run: llmcompressor (Wanda / SparseGPT one-shot) on the same model and the same token ids.

Runs in llmcompressor's OWN environment (it pins transformers 5.15-5.17 and huggingface_hub < 2):
this file imports only torch, transformers, llmcompressor (and its `datasets`), safetensors and
the standard library -- never optimum_statprune. See benchmarks/README-peer.md.

    python benchmarks/peer_llmcompressor.py --model DIR [--gguf-file NAME] --method wanda|sparsegpt \
        --sparsity 0.5 --pattern unstructured|2:4|4:8 --calibration calib.safetensors \
        [--eval eval.safetensors] [--output OUT_DIR] [--device cuda|cpu] [--dtype float16] \
        [--json result.json]

--calibration / --eval are safetensors files holding one LongTensor "input_ids" [n, seqlen].
The calibration windows reach oneshot() as a torch DataLoader (rows of input_ids plus an
all-ones attention_mask, sequential sampler, --batch-size): nothing is re-tokenized, truncated or
reordered. (--feed dataset hands oneshot a datasets.Dataset instead; with shuffling off its
LengthAwareSampler argsorts equal lengths with an unstable sort and so permutes the samples:
same samples, different order.) --method dense skips pruning, to check the evaluation.

Timing: end_to_end_s covers load -> calibrate -> prune -> save (after imports and after reading
the token file); pruning_s is the oneshot() call alone (calibration forward passes included).
The result is written to --json and printed as the last line of stdout (logs go to stderr).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import time
from pathlib import Path

PATTERNS = {"unstructured": "0:0", "2:4": "2:4", "4:8": "4:8"}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="local Hugging Face model directory")
    p.add_argument("--gguf-file", default=None, help="GGUF file name inside --model (dequantized by transformers)")
    p.add_argument("--method", required=True, choices=["wanda", "sparsegpt", "dense"],
                   help="dense: no pruning (checks the evaluation against the dense perplexity)")
    p.add_argument("--sparsity", type=float, default=0.5)
    p.add_argument("--pattern", default="unstructured", choices=sorted(PATTERNS))
    p.add_argument("--calibration", required=True, help='safetensors file with LongTensor "input_ids" [n, seqlen]')
    p.add_argument("--nsamples", type=int, default=None, help="use only the first N calibration windows")
    p.add_argument("--batch-size", type=int, default=1, help="calibration batch size (llmcompressor default 1)")
    p.add_argument("--feed", default="dataloader", choices=["dataloader", "dataset"],
                   help="hand oneshot a DataLoader in file order (default) or the bare datasets.Dataset")
    p.add_argument("--output", default=None, help="save the pruned model here (dense safetensors)")
    p.add_argument("--device", default=None, choices=["cuda", "cpu"],
                   help="compute device (default: cuda when available); cpu hides the GPUs from llmcompressor")
    p.add_argument("--placement", default="offload", choices=["offload", "device"],
                   help="offload: load the model on the host and let llmcompressor onload one layer at a time "
                        "(its documented usage); device: load the whole model on --device first")
    p.add_argument("--dtype", default="auto", choices=["auto", "float16", "bfloat16", "float32"],
                   help="weights dtype (auto: the checkpoint's; a GGUF is dequantized to float32)")
    p.add_argument("--block-size", type=int, default=128, help="SparseGPT block size")
    p.add_argument("--dampening-frac", type=float, default=0.01, help="SparseGPT dampening fraction")
    p.add_argument("--eval", default=None, help='safetensors file with "input_ids" [n, seqlen] windows: perplexity')
    p.add_argument("--eval-batch-size", type=int, default=1)
    p.add_argument("--json", default=None, help="write the result here")
    return p.parse_args(argv)


class _NoProcessor:
    """Stands in for a tokenizer: the calibration is already token ids, so none is needed, and
    llmcompressor would otherwise fail on model directories without tokenizer files."""

    def save_pretrained(self, *args, **kwargs):
        return None


def _install_datasets_stub() -> bool:
    """llmcompressor 0.14 imports `datasets` at module level (typing.py, args/dataset_arguments.py,
    datasets/utils.py, transformers/data/base.py) but never uses it when oneshot() is handed a torch
    DataLoader. `datasets` drags in pyarrow (55 MB wheel) and pandas, so where it is not installed
    (the GPU machine's wheel set), a stand-in with the imported names is put in sys.modules.
    Returns True when the stand-in is used."""
    import importlib.machinery
    import importlib.util
    import types

    if "datasets" in sys.modules:
        return False
    try:
        if importlib.util.find_spec("datasets") is not None:
            return False
    except (ImportError, ValueError):
        pass

    def _unavailable(*args, **kwargs):
        raise RuntimeError("the `datasets` package is not installed (stand-in from peer_llmcompressor.py)")

    root = types.ModuleType("datasets")
    root.__version__ = "0+stub"
    root.__file__ = __file__
    root.__path__ = []
    root.__spec__ = importlib.machinery.ModuleSpec("datasets", None, is_package=True)
    for name in ("Dataset", "IterableDataset"):
        setattr(root, name, type(name, (), {"__init__": _unavailable, "__module__": "datasets"}))
    root.DatasetDict = type("DatasetDict", (dict,), {"__module__": "datasets"})
    root.IterableDatasetDict = type("IterableDatasetDict", (dict,), {"__module__": "datasets"})
    root.load_dataset = root.load_from_disk = _unavailable
    formatting = types.ModuleType("datasets.formatting")
    formatting.__path__ = []
    formatting.__spec__ = importlib.machinery.ModuleSpec("datasets.formatting", None, is_package=True)
    inner = types.ModuleType("datasets.formatting.formatting")
    inner.__spec__ = importlib.machinery.ModuleSpec("datasets.formatting.formatting", None)
    inner.LazyRow = type("LazyRow", (dict,), {"__module__": "datasets.formatting.formatting"})
    formatting.formatting = inner
    root.formatting = formatting
    sys.modules.update({"datasets": root, "datasets.formatting": formatting,
                        "datasets.formatting.formatting": inner})
    return True


def _checksum(w) -> list:
    """(sum, sum |w|, zero count) in float64, by row chunks: no full-size temporary that would
    inflate the peak memory figures (a 128k-vocab lm_head is 4 GiB in float64)."""
    total = absolute = 0.0
    zeros = 0
    for chunk in w.detach().split(1024):
        c = chunk.double()
        total += float(c.sum())
        absolute += float(c.abs().sum())
        zeros += int((chunk == 0).sum())
    return [total, absolute, zeros]


def _layer_linears(model):
    import torch

    return [(f"model.layers.{name}", m) for name, m in model.model.layers.named_modules()
            if isinstance(m, torch.nn.Linear)]


def _nm_ok(w, n: int, m: int) -> bool:
    rows, cols = w.shape
    if cols % m:
        return False
    zeros = (w.reshape(rows, cols // m, m) == 0).sum(-1)
    return bool((zeros >= n).all())


def _perplexity(model, ids, device, batch_size: int) -> tuple[float, int]:
    import torch
    import torch.nn.functional as F

    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, ids.shape[0], batch_size):
            x = ids[i:i + batch_size].to(device)
            logits = model(input_ids=x, use_cache=False).logits.float()
            nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                  reduction="sum")
            total += float(nll)
            count += x[:, 1:].numel()
    return math.exp(total / count), count


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.device == "cpu":
        # llmcompressor always computes on the first accelerator it sees (get_main_device)
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # llmcompressor's loguru sink writes to stdout: send fd 1 to stderr, keep stdout for the JSON line
    sys.stdout.flush()
    result_out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)

    import torch
    import transformers
    from safetensors.torch import load_file

    datasets_stub = _install_datasets_stub()  # after transformers: its availability checks stay honest
    if datasets_stub and args.feed == "dataset":
        raise SystemExit("--feed dataset needs the `datasets` package; use --feed dataloader")

    try:
        import llmcompressor
        from llmcompressor import oneshot
        from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    except ImportError as e:  # one line that says what is missing and where it was looked for
        raise SystemExit(f"cannot import llmcompressor: {type(e).__name__}: {e} "
                         f"(PYTHONPATH={os.environ.get('PYTHONPATH', '')!r}, python {sys.version.split()[0]})") from e

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no GPU visible")

    ids = load_file(args.calibration)["input_ids"]
    if ids.dim() != 2:
        raise SystemExit(f"{args.calibration}: input_ids must be [nsamples, seqlen], got {tuple(ids.shape)}")
    if args.nsamples is not None:
        ids = ids[: args.nsamples]
    ids = ids.long().contiguous()
    nsamples, seqlen = ids.shape

    start = time.perf_counter()
    # ---- load
    if args.dtype != "auto":
        dtype = getattr(torch, args.dtype)
    else:
        dtype = torch.float32 if args.gguf_file else "auto"
    load_kwargs = dict(dtype=dtype)
    if args.gguf_file:
        load_kwargs["gguf_file"] = args.gguf_file
    if args.placement == "device":
        load_kwargs["device_map"] = device
    model = transformers.AutoModelForCausalLM.from_pretrained(args.model, **load_kwargs)
    model.eval()
    if args.gguf_file:
        # transformers has dequantized the GGUF into a plain model but still marks it quantized
        # (quantization_config quant_method=gguf, hf_quantizer), and oneshot refuses quantized
        # models; it also re-reads AutoConfig.from_pretrained(config.name_or_path), which fails on a
        # directory holding only a .gguf: drop the marks and point it at a copy of the config.
        import tempfile

        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None

        cfg_dir = tempfile.mkdtemp(prefix="peer-gguf-config-")
        model.config.save_pretrained(cfg_dir)
        model.config._name_or_path = cfg_dir
    load_s = time.perf_counter() - start

    t_check = time.perf_counter()
    lm_head = model.get_output_embeddings()
    lm_head_before = _checksum(lm_head.weight) if lm_head is not None else None
    check_s = time.perf_counter() - t_check  # taken out of end_to_end_s below

    # ---- calibration data: the exact token ids, no re-tokenization, no shuffling
    if args.feed == "dataloader":
        from torch.utils.data import DataLoader, SequentialSampler
        from transformers import default_data_collator

        rows = [{"input_ids": row, "attention_mask": torch.ones_like(row)} for row in ids]
        calib = DataLoader(rows, batch_size=args.batch_size, sampler=SequentialSampler(rows),
                           collate_fn=default_data_collator)
    else:
        from datasets import Dataset

        calib = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})

    mask_structure = PATTERNS[args.pattern]
    common = dict(sparsity=args.sparsity, mask_structure=mask_structure, targets=["Linear"],
                  ignore=["re:.*lm_head"])  # ignore=["lm_head"] does NOT exclude it (names end in "lm_head.")
    if args.method == "wanda":
        recipe = WandaPruningModifier(**common)
    elif args.method == "dense":
        recipe = None
    else:
        recipe = SparseGPTModifier(**common, block_size=args.block_size, dampening_frac=args.dampening_frac)

    # ---- calibrate + prune
    t0 = time.perf_counter()
    if recipe is not None:
        model = oneshot(
            model=model,
            processor=_NoProcessor(),
            dataset=calib,
            recipe=recipe,
            num_calibration_samples=nsamples,
            max_seq_length=seqlen,
            shuffle_calibration_samples=False,
            batch_size=args.batch_size,
            pipeline="sequential",
        )
    pruning_s = time.perf_counter() - t0

    # ---- save (llmcompressor's wrapped save_pretrained; sparse compression is gone in 0.14: dense)
    save_s = None
    if args.output and recipe is not None:
        t1 = time.perf_counter()
        model.save_pretrained(args.output)
        save_s = time.perf_counter() - t1
    end_to_end_s = time.perf_counter() - start - check_s

    peak_gpu = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux -> GiB

    # ---- checks (outside the timings)
    from compressed_tensors.offload import remove_dispatch

    if recipe is not None:
        remove_dispatch(model)  # back to plain modules, weights where they were offloaded (host)
    linears = _layer_linears(model)
    zeros = total = 0
    per_layer = []
    n, m = (int(x) for x in mask_structure.split(":"))
    nm_ok = True
    for name, mod in linears:
        w = mod.weight.detach()
        z = int((w == 0).sum())
        zeros += z
        total += w.numel()
        per_layer.append((name, z / w.numel()))
        if n:
            nm_ok = nm_ok and _nm_ok(w, n, m)
    sparsities = [s for _, s in per_layer]
    lm_head_after = _checksum(model.get_output_embeddings().weight) if lm_head is not None else None

    result = {
        "tool": "llmcompressor",
        "tool_version": llmcompressor.__version__,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "method": args.method,
        "pattern": args.pattern,
        "mask_structure": mask_structure,
        "target_sparsity": args.sparsity,
        "sparsity": zeros / total,
        "sparsity_min_layer": min(sparsities),
        "sparsity_max_layer": max(sparsities),
        "nm_pattern_ok": nm_ok if n else None,
        "targeted_linears": len(linears),
        "lm_head_unchanged": lm_head_before == lm_head_after,
        "nsamples": nsamples,
        "seqlen": seqlen,
        "batch_size": args.batch_size,
        "feed": args.feed,
        "datasets_stub": datasets_stub,
        "device": device,
        "placement": args.placement,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "block_size": args.block_size if args.method == "sparsegpt" else None,
        "dampening_frac": args.dampening_frac if args.method == "sparsegpt" else None,
        "load_s": load_s,
        "pruning_s": pruning_s,
        "save_s": save_s,
        "end_to_end_s": end_to_end_s,
        "peak_gpu_gib": peak_gpu,
        "peak_rss_gib": peak_rss,
        "model": args.model,
        "gguf_file": args.gguf_file,
        "output": args.output,
    }

    if args.eval:
        ev = load_file(args.eval)["input_ids"].long()
        model.to(device)
        t2 = time.perf_counter()
        ppl, ntok = _perplexity(model, ev, device, args.eval_batch_size)
        result.update(perplexity=ppl, eval_windows=int(ev.shape[0]), eval_seqlen=int(ev.shape[1]),
                      eval_tokens=ntok, eval_s=time.perf_counter() - t2)

    text = json.dumps(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    sys.stdout.flush()
    result_out.write(text + "\n")
    result_out.flush()
    return result


if __name__ == "__main__":
    main()

"""Tiny random models of every supported architecture, built from configs (never downloaded)."""

from __future__ import annotations

import torch
import transformers as tf

VOCAB = 128

_COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)


def _llama_like(config_cls, model_cls, **extra):
    def build():
        cfg = config_cls(**_COMMON, intermediate_size=128, num_key_value_heads=2, max_position_embeddings=256, **extra)
        return model_cls(cfg)

    return build


BUILDERS = {
    "llama": _llama_like(tf.LlamaConfig, tf.LlamaForCausalLM),
    "mistral": _llama_like(tf.MistralConfig, tf.MistralForCausalLM, sliding_window=8),
    "qwen2": _llama_like(tf.Qwen2Config, tf.Qwen2ForCausalLM),
    "qwen3": _llama_like(tf.Qwen3Config, tf.Qwen3ForCausalLM, head_dim=16),
    "gemma2": _llama_like(tf.Gemma2Config, tf.Gemma2ForCausalLM, head_dim=16, sliding_window=8),
    "gemma3": _llama_like(
        tf.Gemma3TextConfig, tf.Gemma3ForCausalLM, head_dim=16, sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
    ),
    "phi3": _llama_like(tf.Phi3Config, tf.Phi3ForCausalLM, pad_token_id=0),
    "mixtral": _llama_like(tf.MixtralConfig, tf.MixtralForCausalLM, num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": _llama_like(
        tf.Qwen2MoeConfig, tf.Qwen2MoeForCausalLM, num_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=64, shared_expert_intermediate_size=64, decoder_sparse_step=1,
    ),
    "opt": lambda: tf.OPTForCausalLM(
        tf.OPTConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, ffn_dim=128,
                     word_embed_proj_dim=64, max_position_embeddings=256)
    ),
    "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256)),
    "gpt_neox": lambda: tf.GPTNeoXForCausalLM(
        tf.GPTNeoXConfig(**_COMMON, intermediate_size=128, max_position_embeddings=256)
    ),
    "falcon": lambda: tf.FalconForCausalLM(
        tf.FalconConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                        new_decoder_architecture=False, multi_query=True, parallel_attn=True)
    ),
}


def build(arch: str, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = BUILDERS[arch]()
    model.eval()
    return model


def token_ids(n: int = 6, t: int = 24, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (n, t), generator=g)


def tiny_tokenizer():
    """A word-level tokenizer over a few letters, built in memory (no download)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2}
    for i, w in enumerate("abcdefghijklmnopqrstuvwxyz"):
        vocab[w] = 3 + i
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")


def save_tiny_llama(path, max_shard_size: str | None = None):
    """The tiny Llama and its tokenizer saved at ``path`` (shards of ``max_shard_size`` to get many); ``path``."""
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    build("llama").save_pretrained(path, **kwargs)
    tiny_tokenizer().save_pretrained(path)
    return path


def starve_expert(blocks, expert: int = 3) -> None:
    """Route no token to ``expert`` in any of the MoE ``blocks`` (sent to expert 0 instead), through a hook on
    each router's output."""

    def reroute(module, args, output):
        logits, scores, index = output
        return logits, scores, torch.where(index == expert, torch.zeros_like(index), index)

    for block in blocks:
        block.mlp.gate.register_forward_hook(reroute)

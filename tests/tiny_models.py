"""Tiny random models of every supported architecture and a byte-level tokenizer, for
parity tests (imported by tests; the fixtures live in tests/conftest.py)."""

from __future__ import annotations

import random

import torch

VOCAB = 320  # 256 byte tokens, two specials, and unused rows like real checkpoints have
BOS, EOS = 256, 257


def _byte_symbols() -> list[str]:
    """GPT-2's printable stand-in for each byte 0..255 (what ByteLevel pre-tokenizes into)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    symbols, extra = {}, 0
    for b in range(256):
        if b in printable:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def byte_tokenizer():
    """A byte-level BPE tokenizer with no merges: every UTF-8 byte is one token, so
    multi-byte characters span several tokens (what the detokenizer must survive)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(_byte_symbols())}
    vocab.update({"<s>": BOS, "</s>": EOS})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    fast.add_special_tokens({"bos_token": "<s>", "eos_token": "</s>"})
    return fast


def _tiny_config(arch: str):
    from transformers import LlamaConfig, MistralConfig, OPTConfig, Qwen2Config

    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        max_position_embeddings=1024,
        bos_token_id=BOS,
        eos_token_id=EOS,
        initializer_range=0.2,
    )
    if arch == "llama":
        return LlamaConfig(num_attention_heads=4, num_key_value_heads=4, **common)
    if arch == "llama3":
        scaling = {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
        return LlamaConfig(
            num_attention_heads=8,
            num_key_value_heads=2,
            rope_theta=500000.0,
            rope_scaling=scaling,
            tie_word_embeddings=True,
            **common,
        )
    if arch == "mistral":
        return MistralConfig(
            num_attention_heads=4, num_key_value_heads=2, sliding_window=None, **common
        )
    if arch == "qwen2":
        return Qwen2Config(
            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, **common
        )
    opt = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        ffn_dim=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=1024,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=1,
        init_std=0.2,
    )
    if arch == "opt":
        return OPTConfig(word_embed_proj_dim=64, **opt)
    if arch == "opt350":  # post-norm with projections in and out, as facebook/opt-350m
        return OPTConfig(word_embed_proj_dim=32, do_layer_norm_before=False, **opt)
    raise ValueError(arch)


ARCHS = ("llama", "llama3", "mistral", "qwen2", "opt", "opt350")


def build_tiny_model(arch: str, folder: str, seed: int = 0) -> str:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_tiny_config(arch), dtype=torch.float32)
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    return folder


def mixed_prompts(n: int, lengths: tuple[int, ...], vocab: int = 256, seed: int = 0):
    """n random token-id prompts cycling through the given lengths."""
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(lengths[i % len(lengths)])] for i in range(n)]

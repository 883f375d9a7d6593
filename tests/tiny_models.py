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
    for family in (_llama_family, _new_families, _opt_family, _moe_family):
        config = family(arch, common)
        if config is not None:
            return config
    raise ValueError(arch)


def _llama_family(arch: str, common: dict):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

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
    if arch in ("mistral", "mistral_swa"):
        # A window of 24 keys: prompts of 70 and 130 tokens run far past it, and cache
        # blocks leave it (block size 16).
        window = 24 if arch == "mistral_swa" else None
        return MistralConfig(
            num_attention_heads=4, num_key_value_heads=2, sliding_window=window, **common
        )
    if arch == "qwen2":
        return Qwen2Config(
            num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True, **common
        )
    if arch == "qwen2_swa":  # layer 0 attends globally, layer 1 through a window
        return Qwen2Config(
            num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True,
            sliding_window=20, max_window_layers=1, **common,
        )  # fmt: skip
    return None


def _new_families(arch: str, common: dict):
    from transformers import FalconConfig, Gemma2Config, GemmaConfig, PhiConfig, Qwen3Config

    heads = dict(num_attention_heads=4, num_key_value_heads=2)
    if arch == "qwen3":
        return Qwen3Config(head_dim=32, tie_word_embeddings=True, **heads, **common)
    if arch == "gemma":
        return GemmaConfig(num_attention_heads=4, num_key_value_heads=1, head_dim=32, **common)
    if arch == "gemma2":
        # Small caps so that they change the scores; layer 0 slides over 24 keys.
        return Gemma2Config(
            head_dim=16, query_pre_attn_scalar=24, sliding_window=24,
            attn_logit_softcapping=2.0, final_logit_softcapping=5.0, tie_word_embeddings=False,
            **heads, **common,
        )  # fmt: skip
    if arch == "phi3":
        return _phi3(heads, common)
    if arch == "phi2":
        return PhiConfig(
            num_attention_heads=4, partial_rotary_factor=0.5, hidden_act="gelu_new",
            tie_word_embeddings=False, **common,
        )  # fmt: skip
    falcon = dict(common, num_attention_heads=4, alibi=False)
    falcon.pop("intermediate_size")
    if arch == "falcon7b":  # multi-query, attention and MLP side by side on one LayerNorm
        return FalconConfig(multi_query=True, parallel_attn=True, **falcon)
    if arch == "falcon40b":  # the new decoder architecture: grouped kv heads, two LayerNorms
        return FalconConfig(
            new_decoder_architecture=True, num_kv_heads=2, parallel_attn=True, **falcon
        )
    if arch == "falcon_seq":  # old architecture: a kv head per head, sequential, biases
        return FalconConfig(multi_query=False, parallel_attn=False, bias=True, **falcon)
    return None


def _phi3(heads: dict, common: dict):
    """Fused qkv and gate_up weights; LongRoPE with a pretraining length of 48 (prompts of
    70 and 130 tokens take the long factors throughout, a 33-token prompt crosses 48 while
    generating); partial rotary over half of each head, as Phi-4-mini turns 3/4."""
    from transformers import Phi3Config

    rotary_half = 32 // 2 // 2  # head_dim 32, half of it turns
    scaling = {
        "rope_type": "longrope",
        "short_factor": [1.0 + 0.3 * i for i in range(rotary_half)],
        "long_factor": [2.0 + 1.5 * i for i in range(rotary_half)],
        "original_max_position_embeddings": 48,
        "partial_rotary_factor": 0.5,
    }
    return Phi3Config(
        rope_scaling=scaling, original_max_position_embeddings=48, pad_token_id=0,
        **heads, **dict(common, hidden_size=128),
    )  # fmt: skip


def _opt_family(arch: str, common: dict):
    from transformers import OPTConfig

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
    return None


def _moe_family(arch: str, common: dict):
    from transformers import MixtralConfig, Qwen2MoeConfig

    heads = dict(num_attention_heads=4, num_key_value_heads=2)
    if arch == "mixtral":  # top-2 of 8 experts in every layer
        return MixtralConfig(num_local_experts=8, num_experts_per_tok=2, **heads, **common)
    if arch == "qwen2_moe":  # top-4 of 8 plus the shared expert; layer 1 a dense MLP
        return Qwen2MoeConfig(
            num_experts=8, num_experts_per_tok=4, moe_intermediate_size=32,
            shared_expert_intermediate_size=96, norm_topk_prob=False, mlp_only_layers=[1],
            **heads, **dict(common, num_hidden_layers=3),
        )  # fmt: skip
    return None


ARCHS = ("llama", "llama3", "mistral", "qwen2", "opt", "opt350")
NEW_ARCHS = (
    "mistral_swa", "qwen2_swa", "qwen3", "gemma", "gemma2", "phi3", "phi2",
    "falcon7b", "falcon40b", "falcon_seq",
)  # fmt: skip
MOE_ARCHS = ("mixtral", "qwen2_moe")
ALL_ARCHS = ARCHS + NEW_ARCHS + MOE_ARCHS


def tiny_model_maker(tmp_path_factory):
    """maker(arch) -> folder of a tiny random model of that architecture, each built once
    (what the `tiny_model` fixtures return)."""
    made: dict[str, str] = {}

    def make(arch: str) -> str:
        if arch not in made:
            made[arch] = build_tiny_model(arch, str(tmp_path_factory.mktemp(arch)))
        return made[arch]

    return make


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


def greedy_tokens(engine, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Each prompt's `new_tokens` greedy tokens from an `LLMEngine`, all in one batch."""
    from mii.engine.sampling_params import SamplingParams

    params = SamplingParams(max_new_tokens=new_tokens, min_new_tokens=new_tokens)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    out: dict[str, list[int]] = {str(i): [] for i in range(len(prompts))}
    while engine.has_unfinished_requests():
        for o in engine.step():
            out[o.request_id].extend(o.token_ids)
    return [out[str(i)] for i in range(len(prompts))]

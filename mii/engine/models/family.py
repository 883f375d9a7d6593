"""How a llama-like checkpoint differs from Llama, read once from its HF config.

Llama 1/2/3, Mistral, Qwen2, Qwen3, Gemma, Gemma-2 and Phi-3 share one attention and one
MLP (models/llama.py); what tells them apart is configuration: biases, q/k norms (Qwen3),
Gemma's norm scale and embedding scale, the gated activation, the attention scale and
soft-capping, sliding windows per layer, partial rotary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mii.engine.layers.rotary import rope_parameters, rotary_dim

_GELU_TANH = {"gelu_pytorch_tanh", "gelu_new", "gelu_fast", "gelu"}  # Gemma's "gelu" is tanh


def head_dim(cfg: Any) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def num_kv_heads(cfg: Any) -> int:
    return getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads


def layer_windows(cfg: Any) -> tuple[int | None, ...]:
    """Each layer's sliding window (None: full attention), as transformers 5 sets them:
    `layer_types` where the config has them (Gemma-2, Qwen2/3), else every layer of a
    config with a window (Mistral, Phi-3)."""
    layers = cfg.num_hidden_layers
    window = getattr(cfg, "sliding_window", None)
    if not window or getattr(cfg, "use_sliding_window", True) is False:
        return (None,) * layers
    types = getattr(cfg, "layer_types", None)
    if types:
        return tuple(window if t == "sliding_attention" else None for t in types)
    if cfg.model_type in ("qwen2", "qwen3"):  # transformers 4: the top layers slide
        first = getattr(cfg, "max_window_layers", 0)
        return tuple(window if i >= first else None for i in range(layers))
    return (window,) * layers


def shared_window(cfg: Any) -> int | None:
    """The sliding window when every layer has one (the largest), else None: cache blocks
    that left it are never read again (the block manager frees them)."""
    windows = layer_windows(cfg)
    return None if None in windows else max(windows)


def _activation(cfg: Any) -> str:
    name = getattr(cfg, "hidden_activation", None) or getattr(cfg, "hidden_act", "silu")
    if name == "silu":
        return "silu"
    if name in _GELU_TANH and cfg.model_type.startswith("gemma"):
        return "gelu_tanh"
    raise NotImplementedError(f"gated activation {name!r} is not supported")


@dataclass(frozen=True)
class Family:
    head_dim: int
    num_kv_heads: int
    rotary_dim: int
    qkv_bias: bool
    out_bias: bool
    mlp_bias: bool
    qk_norm: bool
    """RMSNorm of each head's q and k before rotary (Qwen3)."""
    gemma_norm: bool
    """RMSNorm scale 1 + weight (Gemma)."""
    embed_scale: float | None
    """Embeddings times sqrt(hidden_size) (Gemma)."""
    activation: str
    attn_scale: float
    attn_softcap: float | None
    final_softcap: float | None
    windows: tuple[int | None, ...]

    @classmethod
    def of(cls, cfg: Any) -> Family:
        gemma = cfg.model_type in ("gemma", "gemma2")
        dim = head_dim(cfg)
        attention_bias = bool(getattr(cfg, "attention_bias", False))
        scalar = getattr(cfg, "query_pre_attn_scalar", None) or dim  # Gemma-2's own scale
        return cls(
            head_dim=dim,
            num_kv_heads=num_kv_heads(cfg),
            rotary_dim=rotary_dim(dim, rope_parameters(cfg)),
            # Qwen2 always has them; Qwen2-MoE's config says so as qkv_bias
            qkv_bias=cfg.model_type == "qwen2" or attention_bias or getattr(cfg, "qkv_bias", False),
            out_bias=attention_bias,
            mlp_bias=bool(getattr(cfg, "mlp_bias", False)),
            qk_norm=cfg.model_type == "qwen3",
            gemma_norm=gemma,
            embed_scale=cfg.hidden_size**0.5 if gemma else None,
            activation=_activation(cfg),
            attn_scale=scalar**-0.5,
            attn_softcap=getattr(cfg, "attn_logit_softcapping", None),
            final_softcap=getattr(cfg, "final_logit_softcapping", None),
            windows=layer_windows(cfg),
        )

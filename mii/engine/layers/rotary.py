"""Rotary position embedding tables (default, linear and llama3 scaling)."""

from __future__ import annotations

import math
from typing import Any

import torch


def rope_parameters(hf_config: Any) -> dict[str, Any]:
    """The rope settings of a config from transformers 4 (`rope_theta`, `rope_scaling`) or
    5 (`rope_parameters`), as one dict with at least `rope_theta` and `rope_type`."""
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    scaling = getattr(hf_config, "rope_scaling", None) or {}
    params = {**scaling, **params}
    params.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    return params


def _inv_freq(dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _llama3_inv_freq(inv_freq: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
    factor = params["factor"]
    low, high = params["low_freq_factor"], params["high_freq_factor"]
    old_len = params["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / high) & ~(wavelen > old_len / low)
    return torch.where(medium, smoothed, scaled)


def cos_sin_cache(head_dim: int, max_positions: int, params: dict[str, Any]) -> torch.Tensor:
    """(max_positions, head_dim) float32: cos of each position's angles, then sin.

    Angles are position * inv_freq in float32, as transformers computes them, so that greedy
    decoding matches it token for token.
    """
    inv_freq = _inv_freq(head_dim, params["rope_theta"])
    kind = params["rope_type"]
    if kind == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, params)
    elif kind == "linear":
        inv_freq = inv_freq / params["factor"]
    elif kind != "default":
        raise NotImplementedError(f"rope scaling {kind!r} is not supported")
    angles = torch.outer(torch.arange(max_positions, dtype=torch.int64).float(), inv_freq)
    return torch.cat((angles.cos(), angles.sin()), dim=-1)

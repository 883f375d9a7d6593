"""Rotary position embedding tables (default, linear, llama3 and longrope scaling; partial
rotary)."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch


def rope_parameters(hf_config: Any) -> dict[str, Any]:
    """The rope settings of a config from transformers 4 (`rope_theta`, `rope_scaling`) or
    5 (`rope_parameters`), as one dict with at least `rope_theta`, `rope_type` and
    `partial_rotary_factor`."""
    params = dict(getattr(hf_config, "rope_parameters", None) or {})
    scaling = getattr(hf_config, "rope_scaling", None) or {}
    params = {**scaling, **params}
    params.setdefault("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    if params["rope_type"] == "su":  # the first Phi-3 128k configs' name for longrope
        params["rope_type"] = "longrope"
    partial = params.get("partial_rotary_factor") or getattr(hf_config, "partial_rotary_factor", 1)
    params["partial_rotary_factor"] = partial
    for key in ("max_position_embeddings", "original_max_position_embeddings"):
        if params.get(key) is None and getattr(hf_config, key, None) is not None:
            params[key] = getattr(hf_config, key)
    return params


def rotary_dim(head_dim: int, params: dict[str, Any]) -> int:
    """How many leading dims of a head turn (Phi-2 turns 32 of 80)."""
    return int(head_dim * params["partial_rotary_factor"])


class LongPromptRope(NamedTuple):
    """LongRoPE as transformers applies it: every token of a sequence longer than
    `original` tokens turns with the long factors, of a shorter one with the short
    factors; a sequence growing past `original` computes its cache again (the scheduler's
    `recompute_at`). The table's rows `[0, max_positions)` hold short-then-long angles
    (short below `original`), rows from `offset` on the long angles of the positions below
    `original`: a long sequence's token below `original` looks up `position + offset`
    (see StepPlan.build)."""

    original: int
    offset: int


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


def _angles(positions: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    return torch.outer(positions.float(), inv_freq)


def _table(angles: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    return torch.cat((angles.cos() * scale, angles.sin() * scale), dim=-1)


def longrope_attention_factor(params: dict[str, Any]) -> float:
    original = params["original_max_position_embeddings"]
    factor = params.get("factor") or params["max_position_embeddings"] / original
    if params.get("attention_factor") is not None:
        return params["attention_factor"]
    return 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))


def _longrope_table(dim: int, max_positions: int, params: dict[str, Any]) -> torch.Tensor:
    original = params["original_max_position_embeddings"]
    shape = torch.arange(0, dim, 2, dtype=torch.int64).float() / dim
    base = params["rope_theta"] ** shape
    short = 1.0 / (torch.tensor(params["short_factor"], dtype=torch.float32) * base)
    long = 1.0 / (torch.tensor(params["long_factor"], dtype=torch.float32) * base)
    positions = torch.arange(max_positions, dtype=torch.int64)
    angles = torch.where(
        (positions < original)[:, None], _angles(positions, short), _angles(positions, long)
    )
    below = torch.arange(min(original, max_positions), dtype=torch.int64)
    angles = torch.cat((angles, _angles(below, long)))  # rows from max_positions on
    return _table(angles, longrope_attention_factor(params))


def long_prompt_rope(params: dict[str, Any], max_positions: int) -> LongPromptRope | None:
    """The LongRoPE rule of a model with longrope scaling, else None."""
    if params["rope_type"] != "longrope":
        return None
    return LongPromptRope(params["original_max_position_embeddings"], max_positions)


def cos_sin_cache(dim: int, max_positions: int, params: dict[str, Any]) -> torch.Tensor:
    """(rows, dim) float32: cos of each position's angles, then sin; `dim` is the rotary
    width. Rows are the positions, and for longrope the rows `LongPromptRope` adds.

    Angles are position * inv_freq in float32, as transformers computes them, so that greedy
    decoding matches it token for token.
    """
    kind = params["rope_type"]
    if kind == "longrope":
        return _longrope_table(dim, max_positions, params)
    inv_freq = _inv_freq(dim, params["rope_theta"])
    if kind == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, params)
    elif kind == "linear":
        inv_freq = inv_freq / params["factor"]
    elif kind != "default":
        raise NotImplementedError(f"rope scaling {kind!r} is not supported")
    return _table(_angles(torch.arange(max_positions, dtype=torch.int64), inv_freq))

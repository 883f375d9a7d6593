"""Kernel dispatch: Triton on CUDA tensors, the torch references otherwise.

(Provisional: references only, until the Triton launchers land.)
"""

from __future__ import annotations

import torch

from mii.kernels import torch_ref


def rms_norm(x, weight, eps, residual=None):
    return torch_ref.rms_norm_ref(x, weight, eps, residual)


def silu_and_mul(x):
    return torch_ref.silu_and_mul_ref(x)


def rope_kv_write(q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping) -> None:
    torch_ref.rope_kv_write_ref(q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping)


def paged_attention(
    q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale, *, max_query_len: int
) -> torch.Tensor:
    return torch_ref.paged_attention_ref(
        q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale
    )

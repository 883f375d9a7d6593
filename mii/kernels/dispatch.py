"""Kernel dispatch: the Triton launchers for CUDA tensors, the torch references otherwise.

The engine calls only these functions. Triton is imported inside the CUDA branch, so CPU
users never pay for the import; `MII_DISABLE_TRITON=1` forces the references everywhere.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from mii.kernels import torch_ref
from mii.kernels.fp8_ref import QuantizedRows
from mii.kernels.fused_moe_ref import ExpertScales
from mii.kernels.torch_ref import SplitSums


def _triton_on(t: torch.Tensor) -> bool:
    return t.is_cuda and os.environ.get("MII_DISABLE_TRITON", "0") != "1"


GEMV_MAX_ROWS = 1
"""scripts/bench_gemv.py on an H200, 32 Mistral-7B layers: at one row the GEMV took 3.62 ms
of bf16 weights against cuBLAS's 3.68 and 2.43 ms of FP8 ones against the W8A8 path's 2.75;
at two rows 4.57 / 2.89 against 3.70 / 2.75, so two rows and more stay where they were."""


def gemv_on(x: torch.Tensor) -> bool:
    """Whether a linear layer's product with x goes through kernels/gemv.py: CUDA, 2-D x of
    at most GEMV_MAX_ROWS rows (batch-1 decode steps), `MII_GEMV` not 0."""
    return (
        x.dim() == 2
        and x.shape[0] <= GEMV_MAX_ROWS
        and _triton_on(x)
        and os.environ.get("MII_GEMV", "1") != "0"
    )


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    w_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
    gated: str | None = None,
    defer: bool = False,
    push: Any = None,
) -> torch.Tensor | SplitSums | Any:
    """x @ (weight * w_scale[:, None]).T + bias for the rows `gemv_on` admits; with `gated`
    (a gated activation's name, "silu" or "gelu_tanh"), x is [gate | up] and the product is
    act_and_mul(x, gated) @ ..., the activation done inside the GEMV. `defer`: the product
    of float8 weights may come as its `SplitSums`, for a reader that adds them up
    (`rms_norm`); `MII_DEFER_SPLITS=0` turns that off. Not bf16 weights: on an H200 (Mistral-7B
    shape, batch 1) FP8 went from 2.54 to 2.50 ms a token, but bf16 from 3.91 to 4.00, all of
    it from the down projection (one program reads the seven splits in the norm after it).
    `push`: a row-parallel projection's push buffers (`LinearBase.push_to`): the rows come
    as `Pushed`, sent to the peers already."""
    from mii.kernels.gemv import gemv as kernel

    x = x if x.stride(-1) == 1 else x.contiguous()
    defer = defer and w_scale is not None and os.environ.get("MII_DEFER_SPLITS", "1") != "0"
    return kernel(x, weight, w_scale, bias, gated=gated, defer=defer and push is None, push=push)


def rms_norm(
    x: torch.Tensor | SplitSums,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    unit_offset: bool = False,
    quantize: bool = False,
) -> tuple[torch.Tensor | QuantizedRows, torch.Tensor]:
    """`quantize`: the normed rows come quantized per token for the W8A8 GEMM after them,
    from the same kernel (`QuantizedRows`; CUDA only: the norm asks `fp8_rows_wanted`).
    x may be a deferred GEMV's `SplitSums` (`gemv(..., defer=True)`)."""
    if _triton_on(weight):
        from mii.kernels.rms_norm import rms_norm as kernel

        return kernel(x, weight, eps, residual, unit_offset, quantize)
    if isinstance(x, SplitSums):
        x = x.total()
    assert not quantize, "rows come quantized from the CUDA kernel only"
    return torch_ref.rms_norm_ref(x, weight, eps, residual, unit_offset)


def fp8_rows_wanted(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `fp8_linear` with this float8 weight would quantize x's rows per token (a
    W8A8 GEMM on CUDA, past the one-row GEMV), so that the norm producing x may quantize
    them instead (`rms_norm(..., quantize=True)`: the same rows but for a rare code one
    step apart, without writing x and reading it back). `MII_FP8_NORM_QUANT=0` turns that off."""
    if x.dim() != 2 or not _triton_on(x) or gemv_on(x):
        return False
    if os.environ.get("MII_FP8_NORM_QUANT", "1") == "0":
        return False
    from mii.kernels.fp8_gemm import takes_quantized_rows

    return takes_quantized_rows(x.shape[0], weight.shape[0], weight.shape[1], x.dtype)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    if _triton_on(x):
        from mii.kernels.activation import silu_and_mul as kernel

        return kernel(x)
    return torch_ref.silu_and_mul_ref(x)


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:
    if _triton_on(x):
        from mii.kernels.activation import gelu_tanh_and_mul as kernel

        return kernel(x)
    return torch_ref.gelu_tanh_and_mul_ref(x)


def act_and_mul(x: torch.Tensor, activation: str) -> torch.Tensor:
    """The gated activation named `activation` ("silu", "gelu_tanh") over x = [gate | up]."""
    if activation == "silu":
        return silu_and_mul(x)
    if activation == "gelu_tanh":
        return gelu_tanh_and_mul(x)
    raise ValueError(f"no gated activation {activation!r}")


def rope_kv_write(
    q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping, step: dict | None = None,
    *, k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
) -> None:  # fmt: skip
    """`step`: a dict that lives for one step; the torch path keeps there what every layer
    of the step shares (the Triton kernels need none of it). `k_scale`, `v_scale`: the
    (Hkv,) scales of an fp8 cache (torch_ref says how it is stored)."""
    scales = {"k_scale": k_scale, "v_scale": v_scale}
    if _triton_on(q):
        from mii.kernels.rope_kv_write import rope_kv_write as kernel

        kernel(q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping, **scales)
        return
    torch_ref.rope_kv_write_ref(
        q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping, step, **scales
    )


def paged_attention(
    q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale, *,
    max_query_len: int, step: dict | None = None, window: int | None = None,
    softcap: float | None = None, k_scale: torch.Tensor | None = None,
    v_scale: torch.Tensor | None = None, num_decodes: int = 0,
    prompts: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:  # fmt: skip
    """Decode-only steps (max_query_len == 1, known on the host) take the split-K kernel,
    which keeps the GPU busy at small batches; mixed steps take the ragged kernel, their
    leading `num_decodes` one-token sequences the split-K kernel when `prompts` gives the
    rest's tables (kernels/paged_attention.py). `step`:
    as in `rope_kv_write` (the torch path's attention layout, one per window). `window`:
    sliding-window attention over the last `window` keys; `softcap`: tanh soft-capping of
    the scores; `k_scale`, `v_scale`: an fp8 cache's (see torch_ref)."""
    scales = {"k_scale": k_scale, "v_scale": v_scale}
    if not _triton_on(q):
        key = ("attention", q.shape[1] // k_cache.shape[2], window)
        step = {} if step is None else step
        if key not in step:
            step[key] = torch_ref.attention_layout(
                q.shape[0], key[1], block_tables, query_start_loc, seq_lens, window
            )
        return torch_ref.paged_attention_ref(
            q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale, step[key],
            softcap=softcap, **scales,
        )  # fmt: skip
    if max_query_len == 1 and q.shape[0] == seq_lens.shape[0]:
        from mii.kernels.decode_attention import decode_attention as decode

        return decode(
            q, k_cache, v_cache, block_tables, seq_lens, scale, window=window, softcap=softcap,
            **scales,
        )  # fmt: skip
    from mii.kernels.paged_attention import paged_attention as kernel

    return kernel(
        q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale,
        max_query_len=max_query_len, window=window, softcap=softcap,
        num_decodes=num_decodes, prompts=prompts, **scales,
    )  # fmt: skip


def split_prompts(
    block_tables: torch.Tensor, query_start_loc: torch.Tensor, seq_lens: torch.Tensor, d: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`paged_attention`'s `prompts` for a step whose first d sequences are decodes: the
    block tables, query_start_loc from 0 and seq_lens of the rest, in tensors of their own
    (views d rows in are 16-byte aligned for some d only, and a Triton kernel compiles once
    for each alignment it meets: seconds, in the middle of serving)."""
    return block_tables[d:].clone(), query_start_loc[d:] - d, seq_lens[d:].clone()


def decode_attention(
    q, k_cache, v_cache, block_tables, seq_lens, scale, *, num_splits: int | None = None,
    window: int | None = None, softcap: float | None = None,
    k_scale: torch.Tensor | None = None, v_scale: torch.Tensor | None = None,
) -> torch.Tensor:  # fmt: skip
    scales = {"k_scale": k_scale, "v_scale": v_scale}
    if _triton_on(q):
        from mii.kernels.decode_attention import decode_attention as kernel

        return kernel(
            q, k_cache, v_cache, block_tables, seq_lens, scale, num_splits=num_splits,
            window=window, softcap=softcap, **scales,
        )  # fmt: skip
    starts = torch.arange(q.shape[0] + 1, dtype=torch.int32, device=q.device)
    return torch_ref.paged_attention_ref(
        q, k_cache, v_cache, block_tables, starts, seq_lens, scale, window=window,
        softcap=softcap, **scales,
    )  # fmt: skip


def fused_moe(
    x: torch.Tensor,
    router_logits: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    top_k: int,
    renormalize: bool,
    scales: ExpertScales | None = None,
    sum_top_k: bool = True,
) -> torch.Tensor:
    """The routed experts of a mixture-of-experts layer (kernels/fused_moe_ref.py says how);
    float8 experts with their row `scales`. Without `sum_top_k`: (T, K, H) whose sum over
    dim 1 is the result (the kernel's top_k weighted outputs; the reference's sum, K = 1),
    for a caller that folds that sum into its all-reduce."""
    if _triton_on(x):
        from mii.kernels.fused_moe import fused_moe as kernel

        return kernel(x, router_logits, gate_up, down, top_k, renormalize, scales=scales,
                      sum_top_k=sum_top_k)  # fmt: skip
    from mii.kernels.fused_moe_ref import fused_moe_ref, route_ref

    routing = route_ref(router_logits, top_k, renormalize)
    out = fused_moe_ref(x, gate_up, down, routing, scales)
    return out if sum_top_k else out.unsqueeze(1)


def fp8_linear(
    x: torch.Tensor | QuantizedRows,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    gated: str | None = None,
    defer: bool = False,
    push: Any = None,
) -> torch.Tensor | SplitSums | Any:
    """x @ (weight * scale[:, None]).T + bias with float8 weights (kernels/fp8_ref.py): on
    CUDA the GEMV for one row (`gemv_on`), else Triton or `torch._scaled_mm` by M
    (kernels/fp8_gemm.py); otherwise the weight dequantized into x's dtype for this call.
    `gated`: x is [gate | up] and act_and_mul(x, gated) is multiplied (inside the GEMV; in
    the per-token quantization before a W8A8 GEMM). x may come quantized already
    (`rms_norm(..., quantize=True)`, where `fp8_rows_wanted`). `defer`, `push`: as `gemv`'s."""
    if isinstance(x, QuantizedRows):
        from mii.kernels.fp8_gemm import quantized_linear

        return quantized_linear(x, weight, scale, bias)
    if gemv_on(x):
        return gemv(x, weight, scale, bias, gated, defer, push)
    if _triton_on(x):
        from mii.kernels.fp8_gemm import fp8_linear as kernel

        return kernel(x, weight, scale, bias, gated=gated)
    from mii.kernels.fp8_ref import fp8_linear_ref

    if gated is not None:
        x = act_and_mul(x, gated)
    return fp8_linear_ref(x, weight, scale, bias)

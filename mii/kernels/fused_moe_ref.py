"""Torch reference of the fused mixture-of-experts layer: the contract of
kernels/fused_moe.py and the engine's CPU path.

Layout, as transformers 5 fuses its experts: `gate_up` (E, 2I, H) holds each expert's gate
rows then its up rows; `down` (E, H, I). Under tensor parallelism each rank holds its slice
of every expert's I (gate and up rows alike, down columns), and the result is a partial sum
that the caller all-reduces.

Routing (`route_ref`): softmax over all E router logits in float32, the top k experts by
probability, their probabilities as weights, renormalised to sum to one when asked
(Mixtral always; Qwen2-MoE per `norm_topk_prob`). Mixtral's softmax over only the top-k
logits is the same as the renormalised top-k of the full softmax.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from mii.kernels.fp8_ref import dequantize_rows, quantize_rows
from mii.kernels.torch_ref import silu_and_mul_ref


class Routing(NamedTuple):
    weights: torch.Tensor  # (T, k) float32, each token's weight for its j-th expert
    experts: torch.Tensor  # (T, k) int64, experts by falling probability


def route_ref(logits: torch.Tensor, top_k: int, renormalize: bool) -> Routing:
    """logits: (T, E) router logits of any float dtype."""
    probs = torch.softmax(logits.float(), dim=-1)
    weights, experts = probs.topk(top_k, dim=-1)  # (T, k), (T, k)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return Routing(weights, experts)


ExpertScales = tuple[torch.Tensor, torch.Tensor]
"""Float8 experts' row scales: gate_up's (E, 2I) and down's (E, H), float32."""


def fused_moe_ref(
    x: torch.Tensor,
    gate_up: torch.Tensor,
    down: torch.Tensor,
    routing: Routing,
    scales: ExpertScales | None = None,
) -> torch.Tensor:
    """sum_j weights[t, j] * down_e(silu(gate_e x_t) * up_e x_t) with e = experts[t, j].

    x: (T, H); returns (T, H) in x's dtype, summed in float32. One sort of the (token, slot)
    pairs by expert, then per expert that got any: a gather of its tokens, two matmuls, and
    an index_add of the weighted rows (the best plain-torch formulation on CPU). Float8
    experts come with `scales` (gate_up's (E, 2I), down's (E, H)): each expert used is
    dequantized into x's dtype for the call (w * scale of its row)."""
    tokens, top_k = routing.experts.shape
    flat = routing.experts.flatten()  # (T*k,) entry t*k + j
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=gate_up.shape[0]).tolist()
    rows = order // top_k  # the token of each sorted entry
    weights = routing.weights.flatten()[order].unsqueeze(1)  # (T*k, 1)
    out = torch.zeros((tokens, x.shape[1]), dtype=torch.float32, device=x.device)
    start = 0
    for expert, count in enumerate(counts):
        if count:
            picked = rows[start : start + count]
            w_gate_up, w_down = gate_up[expert], down[expert]
            if scales is not None:
                w_gate_up = dequantize_rows(w_gate_up, scales[0][expert], x.dtype)
                w_down = dequantize_rows(w_down, scales[1][expert], x.dtype)
            h = silu_and_mul_ref(F.linear(x.index_select(0, picked), w_gate_up))
            y = F.linear(h, w_down)  # (count, H)
            out.index_add_(0, picked, y.float() * weights[start : start + count])
        start += count
    return out.to(x.dtype)


def quantize_experts(stack: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One weight of every expert, (E, N, K), as float8 (E, N, K) with its row scales (E, N)
    (`fp8_ref.quantize_rows` over every expert's rows)."""
    q, scale = quantize_rows(stack.flatten(0, 1))
    return q.view(stack.shape), scale.view(stack.shape[:2])


def check_expert_weights(x, gate_up, down, scales: ExpertScales | None) -> None:
    """The operand checks of the expert kernels (fused_moe.py, moe_gemv.py): x (T, H) with
    dense rows, gate_up (E, 2I, H) and down (E, H, I) in x's dtype, or float8 with `scales`."""
    assert x.dim() == 2 and x.stride(1) == 1, "x: (T, H) with dense rows"
    experts, two_inner, hidden = gate_up.shape
    assert two_inner % 2 == 0 and hidden == x.shape[1], "gate_up: (E, 2I, H)"
    assert down.shape == (experts, hidden, two_inner // 2), "down: (E, H, I)"
    assert gate_up.dtype == down.dtype, "gate_up and down share one dtype"
    if scales is None:
        assert gate_up.dtype == x.dtype, "x and the experts share one dtype"
    else:
        assert gate_up.dtype == torch.float8_e4m3fn, "scales come with float8 experts"
        assert scales[0].shape == (experts, two_inner) and scales[1].shape == (experts, hidden)
        assert all(s.dtype == torch.float32 and s.stride(1) == 1 for s in scales)
    assert gate_up.device == down.device == x.device
    assert gate_up.stride(2) == 1 and down.stride(2) == 1, "weights: dense last dim"

"""FP8-weight GEMMs: a Triton kernel (weight-only or W8A8), `torch._scaled_mm`, and the
choice between them per shape (`fp8_linear`). The contracts are in kernels/fp8_ref.py.

- Weight-only (W8A16): x stays bf16; each float8 weight tile is converted in registers and
  multiplied on the bf16 tensor cores, the per-channel scale applied once to the float32
  sum.
- W8A8 with tile-wise activation scales (`a_block_quant`): x stays bf16 in memory; the
  kernel quantizes each (row, K tile) of x it loads with its own scale (absolute maximum of
  those BLOCK_K values / 448) and multiplies float8 by float8 on the tensor cores, each
  tile's float32 product scaled by its row's scale as it is added. Decoding (M of 1 to a few
  dozen) is bound by reading the weights: no weight conversion in the loop and no
  quantization launch before it, and scales per tile are finer than per token.
- W8A8: x is quantized per token (kernels/fp8_quant.py), both operands multiply on the fp8
  tensor cores and the sum is scaled by scale_x[m] * scale_w[n]. `torch._scaled_mm`
  (cuBLASLt, row-wise scales) computes the same; prefill-sized M is compute bound, where
  fp8's doubled tensor-core rate pays.

The choice is a fixed rule by M (`choose_backend`), from scripts/bench_fp8.py's table of
every backend at the Mistral-7B shapes on an H100.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from mii.kernels.activation import gelu_tanh_and_mul, silu_and_mul
from mii.kernels.fp8_quant import act_and_mul_quantize_rows, quantize_rows
from mii.kernels.fp8_ref import FP8_MAX, MIN_SCALE, QuantizedRows
from mii.kernels.gemv import GATED_REFS

TRITON_MAX_M = 64
"""Up to this many rows the Triton W8A8 kernel runs; past it _scaled_mm (scripts/bench_fp8.py
on an H100: Triton ahead up to 64 rows, cuBLASLt from 256)."""
BACKENDS = ("triton", "triton_w8a8", "triton_w8a8_block", "scaled_mm", "scaled_mm_fast_accum")
"""`scaled_mm_fast_accum`: cuBLASLt's faster fp8 accumulation (partial sums kept at lower
precision between promotions), for benchmarks to weigh against `scaled_mm`."""
W8A8_BACKENDS = ("triton_w8a8", "scaled_mm", "scaled_mm_fast_accum")
"""The backends that quantize activations per token: the ones `QuantizedRows` go through."""
SHARED_MEMORY = 200 * 1024  # bytes of pipelined tiles a program may hold (H100: 227 KB)


class Fp8Tile(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    group_m: int = 8
    split_k: int = 1
    """Programs that share one output tile's K range (summed with float32 atomics, so not
    bit-reproducible): more programs for narrow outputs over long K at small M."""


def tile_for(m: int, n: int) -> Fp8Tile:
    """Tiles by M (and N at decode sizes), from bench_fp8's sweep on an H100 over the
    Mistral-7B projections. M <= 16: outputs as wide as gate_up's 28,672 have programs
    enough for 128-column tiles over long K tiles; narrower ones take 32-column tiles, and
    at M <= 4 128-column tiles with each output's K range split over 4 programs (float32
    atomics) instead (M=1: qkv 13.6 us, o 11.0, gate_up 45.3, down 28.6 - 3.15 ms over 32
    layers against 3.31 with one tile for all; M=16: 3.00 ms against 3.61). Larger M: the
    square tiles of compute-bound GEMMs."""
    if m <= 16:
        if n >= 16384:
            return Fp8Tile(16, 128, 256, 4, 3)
        if m <= 4:
            return Fp8Tile(16, 128, 256, 8, 3, split_k=4)
        return Fp8Tile(16, 32, 256, 4, 5)
    if m <= 32:
        return Fp8Tile(32, 64, 128, 4, 4)
    if m <= 64:
        return Fp8Tile(64, 64, 128, 4, 4)
    if m <= 128:
        return Fp8Tile(64, 128, 128, 4, 3)
    return Fp8Tile(128, 128, 128, 8, 3)


def _fit(tile: Fp8Tile, a_itemsize: int, w_itemsize: int = 1) -> Fp8Tile:
    """Fewer stages, then shorter K tiles, until the pipelined tiles fit in shared memory
    (float32 activations, as the tests run, take four times the bytes of float8 ones)."""
    while True:
        stage = (tile.block_m * a_itemsize + tile.block_n * w_itemsize) * tile.block_k
        if stage * tile.num_stages <= SHARED_MEMORY or tile.block_k <= 32:
            return tile
        if tile.num_stages > 2:
            tile = tile._replace(num_stages=tile.num_stages - 1)
        else:
            tile = tile._replace(block_k=tile.block_k // 2)


@triton.jit
def _fp8_gemm_kernel(
    a_ptr, w_ptr, a_scale_ptr, w_scale_ptr, bias_ptr, out_ptr,
    M, N, K, stride_am, stride_wn, stride_om,
    A_FP8: tl.constexpr, A_BLOCK_QUANT: tl.constexpr, W_SCALED: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    EVEN_K: tl.constexpr, FP8_MAX: tl.constexpr, MIN_SCALE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, SPLIT_K: tl.constexpr,
):  # fmt: skip
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    # Groups of GROUP_M row tiles walk the column tiles together: their weights stay in L2.
    per_group = GROUP_M * tiles_n
    first_m = (pid // per_group) * GROUP_M
    group_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_rows
    pid_n = (pid % per_group) // group_rows
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    # Rows and columns past the edge read row 0 / column 0 again (never stored): no masks.
    rm_in = tl.where(rm < M, rm, 0).to(tl.int64)
    rn_in = tl.where(rn < N, rn, 0).to(tl.int64)
    k_tiles = tl.cdiv(K, BLOCK_K)
    per_split = tl.cdiv(k_tiles, SPLIT_K)
    k_first = pid_k * per_split  # this program's first K tile
    ks = k_first * BLOCK_K + rk
    a_ptrs = a_ptr + rm_in[:, None] * stride_am + ks[None, :]  # (BLOCK_M, BLOCK_K)
    w_ptrs = w_ptr + rn_in[None, :] * stride_wn + ks[:, None]  # (BLOCK_K, BLOCK_N) of w.T
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(k_first, tl.minimum(k_first + per_split, k_tiles)):
        if EVEN_K:
            a = tl.load(a_ptrs)
            w = tl.load(w_ptrs)
        else:
            left = K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=rk[None, :] < left, other=0.0)
            w = tl.load(w_ptrs, mask=rk[:, None] < left, other=0.0)
        if A_FP8:
            acc = tl.dot(a, w, acc)
        elif A_BLOCK_QUANT:  # this tile of x quantized per row, its scale applied to its sum
            af = a.to(tl.float32)
            a_scale = tl.maximum(tl.max(tl.abs(af), 1) / FP8_MAX, MIN_SCALE)
            aq = tl.clamp(af / a_scale[:, None], -FP8_MAX, FP8_MAX).to(w.dtype)
            acc += tl.dot(aq, w) * a_scale[:, None]
        else:
            acc = tl.dot(a, w.to(a.dtype), acc)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if W_SCALED:
        acc = acc * tl.load(w_scale_ptr + rn_in)[None, :]
    if A_FP8:
        acc = acc * tl.load(a_scale_ptr + rm_in)[:, None]
    if HAS_BIAS:  # noqa: SIM102 (a static if around a dynamic one)
        if pid_k == 0:
            acc = acc + tl.load(bias_ptr + rn_in).to(tl.float32)[None, :]
    out_ptrs = out_ptr + rm.to(tl.int64)[:, None] * stride_om + rn[None, :]
    mask = (rm[:, None] < M) & (rn[None, :] < N)
    if SPLIT_K == 1:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:  # a float32 output, zeroed by the launcher
        tl.atomic_add(out_ptrs, acc, mask=mask)


def fp8_gemm(
    a: torch.Tensor,
    weight: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    a_scale: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
    tile: Fp8Tile | None = None,
    a_block_quant: bool = False,
) -> torch.Tensor:
    """a (M, K) @ dequantized weight (N, K).T -> (M, N). `a` in bf16/fp16/fp32 (weight-only,
    `fp8_ref.fp8_linear_ref`; with `a_block_quant`, quantized in the kernel per (row, K tile),
    `fp8_ref.fp8_block_w8a8_linear_ref`), or float8 with `a_scale` (M,) (W8A8,
    `fp8_ref.fp8_w8a8_linear_ref`); `out_dtype` defaults to a's dtype (W8A8: required)."""
    assert a.dim() == 2 and a.stride(1) == 1, "a must be (M, K) with dense rows"
    assert weight.dtype == torch.float8_e4m3fn and weight.is_contiguous()
    (m, k), n = a.shape, weight.shape[0]
    assert weight.shape == (n, k), f"weight {tuple(weight.shape)} does not take K={k}"
    assert w_scale.shape == (n,) and w_scale.dtype == torch.float32 and w_scale.is_contiguous()
    a_fp8 = a.dtype == torch.float8_e4m3fn
    assert a_fp8 == (a_scale is not None), "a float8 `a` comes with its a_scale, only then"
    if a_fp8:
        assert a_scale.shape == (m,) and a_scale.dtype == torch.float32
        assert out_dtype is not None, "W8A8 needs an out_dtype"
    assert not (a_fp8 and a_block_quant), "a_block_quant quantizes a higher-precision `a`"
    if bias is not None:
        assert bias.shape == (n,) and bias.is_contiguous()
    out_dtype = out_dtype or a.dtype
    tile = _fit(tile or tile_for(m, n), a.element_size())
    scales = (a_scale if a_fp8 else None, w_scale)
    return _launch(a, weight, scales, bias, out_dtype, tile, a_block_quant)


def _launch(a, weight, scales, bias, out_dtype, tile: Fp8Tile, a_block_quant: bool):
    """Run the kernel: scales = (a_scale or None, w_scale or None)."""
    (m, k), n = a.shape, weight.shape[0]
    a_scale, w_scale = scales
    if tile.split_k > 1:
        out = torch.zeros((m, n), dtype=torch.float32, device=a.device)
    else:
        out = torch.empty((m, n), dtype=out_dtype, device=a.device)
    if m == 0:
        return out.to(out_dtype)
    grid = (triton.cdiv(m, tile.block_m) * triton.cdiv(n, tile.block_n), tile.split_k)
    any_ptr = weight  # stands in for the pointers a flag leaves unread
    _fp8_gemm_kernel[grid](
        a, weight, any_ptr if a_scale is None else a_scale,
        any_ptr if w_scale is None else w_scale, any_ptr if bias is None else bias,
        out, m, n, k, a.stride(0), weight.stride(0), out.stride(0),
        A_FP8=a_scale is not None, A_BLOCK_QUANT=a_block_quant, W_SCALED=w_scale is not None,
        HAS_BIAS=bias is not None, EVEN_K=k % tile.block_k == 0, FP8_MAX=FP8_MAX,
        MIN_SCALE=MIN_SCALE, BLOCK_M=tile.block_m, BLOCK_N=tile.block_n,
        BLOCK_K=tile.block_k, GROUP_M=tile.group_m, SPLIT_K=tile.split_k,
        num_warps=tile.num_warps, num_stages=tile.num_stages,
    )  # fmt: skip
    return out.to(out_dtype)


def small_m_linear(
    a: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tile: Fp8Tile
) -> torch.Tensor:
    """The same kernel over a 16-bit weight (N, K) in a's dtype: a (M, K) @ weight.T
    (+ bias), for scripts/bench_fp8.py --bf16 to weigh against cuBLAS at decode sizes."""
    assert a.dim() == 2 and a.stride(1) == 1 and weight.is_contiguous()
    assert weight.dtype == a.dtype and weight.shape[1] == a.shape[1]
    return _launch(a, weight, (None, None), bias, a.dtype, _fit(tile, a.element_size(), 2), False)


def scaled_mm_rows(q, x_scale, weight, w_scale, bias, fast_accum: bool) -> torch.Tensor:
    """W8A8 through cuBLASLt: per-token quantized rows (q, x_scale) times float8 weights
    with row-wise scales, `torch._scaled_mm` (sm_89+; bf16 output; K and N multiples of
    16)."""
    # _scaled_mm wants the second operand column-major: w (N, K) row-major, transposed.
    y = torch._scaled_mm(
        q, weight.t(), scale_a=x_scale[:, None], scale_b=w_scale[None, :],
        out_dtype=torch.bfloat16, use_fast_accum=fast_accum,
    )  # fmt: skip
    return y if bias is None else y + bias


def choose_backend(m: int, n: int, k: int, dtype: torch.dtype) -> str:
    """Decode-sized M of 16-bit activations: per-token quantization and the Triton W8A8
    kernel (on an H100 the fastest up to 64 rows; quantizing per tile inside the kernel
    measured slower at every M); past it _scaled_mm with fast accumulation where it applies
    (bf16, N and K multiples of 16); weight-only Triton otherwise (float32 activations, odd
    shapes). Fast accumulation measured 11-15% faster than cuBLASLt's promoted sums at
    256-4096 rows (bench_fp8.py, H100), and it is what the sm90 CUTLASS FP8 kernels of other
    servers run at every M; tests/engine/test_fp8_gpu.py holds it to the accuracy bounds."""
    if m <= TRITON_MAX_M and dtype in (torch.bfloat16, torch.float16):
        return "triton_w8a8"
    if dtype != torch.bfloat16 or n % 16 or k % 16:
        return "triton"
    return "scaled_mm_fast_accum"


def _quantized(x2: torch.Tensor, gated: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    """x2's rows quantized per token, after the gated activation when `gated` names one (in
    one pass: `act_and_mul_quantize_rows`)."""
    if gated is None:
        return quantize_rows(x2)
    return act_and_mul_quantize_rows(x2, gated == "gelu_tanh")


def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    backend: str | None = None,
    gated: str | None = None,
) -> torch.Tensor:
    """y = x @ (weight * w_scale[:, None]).T + bias for x (..., K) on the GPU; `backend`
    (one of BACKENDS) overrides `choose_backend` (benchmarks, tests). `gated` ("silu",
    "gelu_tanh"): x is (..., 2K) = [gate | up] and the product is with act(gate) * up,
    rounded as kernels/activation.py rounds it; the W8A8 backends quantize it in the same
    pass (`act_and_mul_quantize_rows`), the others take it from the activation kernel."""
    assert gated is None or gated in GATED_REFS, f"gated activation {gated!r}"
    if isinstance(x, QuantizedRows):
        assert gated is None, "quantized rows are the product's operand already"
        return quantized_linear(x, weight, w_scale, bias, backend)
    x2 = x.reshape(-1, x.shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    k = weight.shape[1]
    assert x2.shape[1] == (k if gated is None else 2 * k), f"x {tuple(x.shape)}, weight K {k}"
    backend = backend or choose_backend(x2.shape[0], weight.shape[0], k, x.dtype)
    if gated is not None and backend in ("triton", "triton_w8a8_block"):
        act = gelu_tanh_and_mul if gated == "gelu_tanh" else silu_and_mul
        x2, gated = act(x2), None  # these take x in its dtype
    if backend == "triton":
        y = fp8_gemm(x2, weight, w_scale, bias)
    elif backend == "triton_w8a8_block":
        y = fp8_gemm(x2, weight, w_scale, bias, a_block_quant=True)
    elif backend in W8A8_BACKENDS:
        q, x_scale = _quantized(x2, gated)
        y = _w8a8(q, x_scale, weight, w_scale, bias, x.dtype, backend)
    else:
        raise ValueError(f"unknown fp8 backend {backend!r}; one of {BACKENDS}")
    return y.view(*x.shape[:-1], weight.shape[0])


def takes_quantized_rows(m: int, n: int, k: int, dtype: torch.dtype) -> bool:
    """Whether `fp8_linear` of m rows of `dtype` with an (n, k) weight quantizes them per
    token (a W8A8 backend by `choose_backend`), so that `QuantizedRows` may stand for them."""
    return choose_backend(m, n, k, dtype) in W8A8_BACKENDS


def quantized_linear(
    rows: QuantizedRows,
    weight: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """`fp8_linear` of activations quantized per token already: (M, N) in `rows.dtype`, the
    bits `fp8_linear` gives for the unquantized rows through the same W8A8 backend."""
    m, k = rows.q.shape
    assert k == weight.shape[1], f"rows {tuple(rows.q.shape)}, weight K {weight.shape[1]}"
    backend = backend or choose_backend(m, weight.shape[0], k, rows.dtype)
    assert backend in W8A8_BACKENDS, f"quantized rows go through {W8A8_BACKENDS}, not {backend}"
    return _w8a8(rows.q, rows.scale, weight, w_scale, bias, rows.dtype, backend)


def _w8a8(q, x_scale, weight, w_scale, bias, dtype: torch.dtype, backend: str) -> torch.Tensor:
    """The product of per-token quantized rows (q, x_scale) with float8 weights."""
    if backend == "triton_w8a8":
        return fp8_gemm(q, weight, w_scale, bias, a_scale=x_scale, out_dtype=dtype)
    fast = backend == "scaled_mm_fast_accum"
    return scaled_mm_rows(q, x_scale, weight, w_scale, bias, fast).to(dtype)

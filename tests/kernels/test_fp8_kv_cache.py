"""The fp8 (e4m3) KV cache: the torch reference's round trip and its accuracy against a
full-precision cache; the Triton write and attention kernels against the reference, in the
interpreter (fp32, fp16) and on the GPU (bf16)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from kernel_testing import TOLERANCE, make_paged_batch, poisoned_allocations, rel_err

from mii.kernels.torch_ref import (
    FP8_DTYPE,
    FP8_MAX,
    dequantize_fp8,
    paged_attention_ref,
    quantize_fp8,
    rope_kv_write_ref,
)

# Heads of very different sizes: a scale applied to the wrong head shows at once. Queries
# shrink as their keys grow, so that every head's scores stay of the usual size.
HEAD_SIZES = (0.01, 1.0, 30.0, 1000.0)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return (a @ b / (a.norm() * b.norm())).item()


def _head_sizes(heads: int, device) -> torch.Tensor:
    return torch.tensor([HEAD_SIZES[h % len(HEAD_SIZES)] for h in range(heads)], device=device)


def _absmax_scales(cache: torch.Tensor) -> torch.Tensor:
    """(Hkv,) scales that map each head's largest value to FP8_MAX."""
    return (cache.float().abs().amax(dim=(0, 1, 3)) / FP8_MAX).contiguous()


def fp8_batch(batch: SimpleNamespace) -> SimpleNamespace:
    """`make_paged_batch`'s step with heads of different sizes and its cache in fp8 too."""
    kv_heads = batch.k_cache.shape[2]
    sizes = _head_sizes(kv_heads, batch.k_cache.device)[:, None]
    group = batch.q.shape[1] // kv_heads
    for h in range(kv_heads):  # in place: q stays a strided view of its fused buffer
        batch.q[:, h * group : (h + 1) * group] /= sizes[h].item()
    k_full = batch.k_cache * sizes.to(batch.k_cache.dtype)
    v_full = batch.v_cache * sizes.flip(0).to(batch.v_cache.dtype)
    k_scale, v_scale = _absmax_scales(k_full), _absmax_scales(v_full)
    fp8 = dict(k_cache=quantize_fp8(k_full, k_scale), v_cache=quantize_fp8(v_full, v_scale))
    extra = dict(k_full=k_full, v_full=v_full, k_scale=k_scale, v_scale=v_scale)
    return SimpleNamespace(**{**vars(batch), **fp8, **extra})


def worst_head_err(out: torch.Tensor, expected: torch.Tensor, kv_heads: int) -> float:
    """rel_err of each KV head's query group apart (their sizes differ by 10^5), the worst."""
    groups = zip(out.chunk(kv_heads, dim=1), expected.chunk(kv_heads, dim=1), strict=True)
    return max(rel_err(a, e) for a, e in groups)


def _reference(b: SimpleNamespace, window=None, softcap=None, fp8=True) -> torch.Tensor:
    caches = (b.k_cache, b.v_cache) if fp8 else (b.k_full, b.v_full)
    scales = {"k_scale": b.k_scale, "v_scale": b.v_scale} if fp8 else {}
    return paged_attention_ref(
        b.q, *caches, b.block_tables, b.query_start_loc, b.seq_lens, b.scale,
        window=window, softcap=softcap, **scales,
    )  # fmt: skip


# ---- the torch reference ----------------------------------------------------------------


def test_quantize_round_trip_keeps_three_mantissa_bits():
    x = torch.randn(64, 4, 32) * _head_sizes(4, "cpu")[:, None]
    scale = x.abs().amax(dim=(0, 2)) / FP8_MAX
    q = quantize_fp8(x, scale)
    assert q.dtype == FP8_DTYPE
    back = dequantize_fp8(q, scale)
    normal = x.abs() >= scale[:, None] * 2**-6  # e4m3's smallest normal
    assert ((back - x).abs() <= x.abs() * 2**-4 + 1e-30)[normal].all()  # half an ulp
    assert rel_err(back, x) < 0.03


def test_quantize_clamps_instead_of_overflowing():
    x = torch.tensor([[[1e6, -1e6, float("inf"), 3.0]]])
    back = dequantize_fp8(quantize_fp8(x, torch.tensor([0.5])), torch.tensor([0.5]))
    assert back.tolist() == [[[224.0, -224.0, 224.0, 3.0]]]


def test_reference_write_then_attention_round_trip():
    """rope_kv_write_ref into an fp8 cache, paged_attention_ref reading it back: close to
    the same through an fp32 cache."""
    tokens, heads, dim, block_size = 40, 4, 64, 16
    gen = torch.Generator().manual_seed(1)
    k = torch.randn(tokens, heads, dim, generator=gen) * _head_sizes(heads, "cpu")[:, None]
    v = torch.randn(tokens, heads, dim, generator=gen)
    q = torch.randn(tokens, 2 * heads, dim, generator=gen)
    q /= _head_sizes(heads, "cpu").repeat_interleave(2)[:, None]
    shape = (4, block_size, heads, dim)
    full = torch.zeros(shape), torch.zeros(shape)
    fp8 = torch.zeros(shape, dtype=FP8_DTYPE), torch.zeros(shape, dtype=FP8_DTYPE)
    scales = {"k_scale": _absmax_scales(k[None]), "v_scale": _absmax_scales(v[None])}
    slots = torch.arange(tokens) + block_size  # blocks 1..3
    positions = torch.arange(tokens)
    rope_kv_write_ref(q, k, v, positions, None, *full, slots)
    rope_kv_write_ref(q, k, v, positions, None, *fp8, slots, **scales)
    back = dequantize_fp8(fp8[0], scales["k_scale"])
    assert rel_err(back, full[0]) < 0.03 and not back[0].any()  # block 0 untouched
    args = (torch.tensor([[1, 2, 3]], dtype=torch.int32), torch.tensor([0, tokens]),
            torch.tensor([tokens]), dim**-0.5)  # fmt: skip
    args = (args[0], args[1].int(), args[2].int(), args[3])
    expected = paged_attention_ref(q, *full, *args)
    got = paged_attention_ref(q, *fp8, *args, **scales)
    assert _cosine(got, expected) >= 0.999 and rel_err(got, expected) < 0.05


@pytest.mark.parametrize(("window", "softcap"), [(None, None), (24, None), (None, 5.0)])
def test_reference_attention_over_fp8_is_close_to_full_precision(window, softcap):
    batch = fp8_batch(
        make_paged_batch(
            [1, 33, 1, 7], [20, 50, 90, 7], 8, 4, 64, dtype=torch.float32, device="cpu"
        )  # fmt: skip
    )
    expected = _reference(batch, window, softcap, fp8=False)
    got = _reference(batch, window, softcap)
    assert _cosine(got, expected) >= 0.99
    assert worst_head_err(got, expected, batch.k_cache.shape[2]) < 0.06


# ---- the Triton kernels in the interpreter ----------------------------------------------


def _write_inputs(
    tokens, q_heads, kv_heads, head_dim, dtype, device, rotary, seed=0, rotary_dim=None
):  # fmt: skip
    """q, k, v as views of one fused qkv; every third slot negative (padding); fp8 caches
    holding old values; k of one token far past its head's scale (clamped on write).
    `rotary_dim`: partial rotary (the dims past it are copied)."""
    gen = torch.Generator().manual_seed(seed)
    block_size, num_blocks = 16, -(-tokens // 16) + 2
    qkv = torch.randn(tokens, q_heads + 2 * kv_heads, head_dim, generator=gen)
    qkv[:, q_heads : q_heads + kv_heads] *= _head_sizes(kv_heads, "cpu")[:, None]
    k_scale = _absmax_scales(qkv[None, :, q_heads : q_heads + kv_heads])
    qkv[1, q_heads] *= 1000.0  # beyond FP8_MAX * scale
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens]
    slots[::3] = -1
    angles = torch.rand(4 * tokens, (rotary_dim or head_dim) // 2, generator=gen) * 6.3
    cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen)
    return dict(
        qkv=qkv.to(device=device, dtype=dtype),
        heads=(q_heads, kv_heads),
        positions=torch.randint(0, 4 * tokens, (tokens,), generator=gen).to(device),
        cos_sin_cache=torch.cat((angles.cos(), angles.sin()), -1).to(device) if rotary else None,
        k_cache=cache.to(device=device, dtype=FP8_DTYPE),
        v_cache=(-cache).to(device=device, dtype=FP8_DTYPE),
        slot_mapping=slots.to(device),
        scales={"k_scale": k_scale.to(device), "v_scale": torch.ones(kv_heads, device=device)},
    )


def _run_write(fn, inputs):
    qkv = inputs["qkv"].clone()
    q_heads, kv_heads = inputs["heads"]
    q, k, v = qkv.split([q_heads, kv_heads, kv_heads], dim=1)
    k_cache, v_cache = inputs["k_cache"].clone(), inputs["v_cache"].clone()
    fn(q, k, v, inputs["positions"], inputs["cos_sin_cache"], k_cache, v_cache,
       inputs["slot_mapping"], **inputs["scales"])  # fmt: skip
    return qkv, k_cache, v_cache


def _check_write(module, inputs, dtype, interpreter: bool) -> None:
    """The rotated q matches; the caches hold the same bytes, the values written clamped to
    the scale's range. On the GPU a rare byte may differ (a rotation rounded apart before
    the write); in the `interpreter` a few bytes its conversion rounds apart (below)."""
    qkv, *caches = _run_write(rope_kv_write_ref, inputs)
    got_qkv, *got_caches = _run_write(module.rope_kv_write, inputs)
    assert rel_err(got_qkv, qkv) < TOLERANCE[dtype]
    scales = inputs["scales"]["k_scale"], inputs["scales"]["v_scale"]
    for got, expected, scale in zip(got_caches, caches, scales, strict=True):
        assert got.dtype == FP8_DTYPE
        back = dequantize_fp8(got, scale)
        assert torch.isfinite(back).all()
        assert back.abs().amax(dim=(0, 1, 3)).le(scale * FP8_MAX).all()
        got_bytes, bytes_ = got.view(torch.uint8), expected.view(torch.uint8)
        same = got_bytes == bytes_
        if interpreter:
            _check_interpreter_slips(bytes_[~same].int(), got_bytes[~same].int())
            assert same.float().mean() >= 0.97
        else:
            assert same.float().mean() >= 0.999
            assert rel_err(back, dequantize_fp8(expected, scale)) < 1e-2


def _check_interpreter_slips(expected: torch.Tensor, got: torch.Tensor) -> None:
    """The interpreter's float-to-fp8 conversion (triton 3.9) rounds ties away from zero,
    not to even; ORs a rounding carry into the exponent instead of adding it (a value that
    rounds up to a power of two may come out as half of it); and shifts subnormals off by
    a step or two. Bytes that differ must differ so; the GPU rounds as torch does."""
    assert ((expected & 0x80) == (got & 0x80)).all(), "signs"
    steps = (expected & 0x7F) - (got & 0x7F)  # e4m3 magnitudes are ordered as their bytes
    halved = (expected & 0x07 == 0) & ((steps == 8) | (steps == 4))
    assert ((steps.abs() <= 2) | halved).all()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("rotary", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_write_matches_reference_interpreted(interpreted, rotary, dtype):
    inputs = _write_inputs(37, 8, 4, 64, dtype, "cpu", rotary)
    _check_write(interpreted.rope_kv_write, inputs, dtype, interpreter=True)


@pytest.mark.timeout(60)
def test_write_with_partial_rotary_interpreted(interpreted):
    inputs = _write_inputs(23, 8, 2, 80, torch.float32, "cpu", True, rotary_dim=32)
    _check_write(interpreted.rope_kv_write, inputs, torch.float32, interpreter=True)


PAGED_CASES = {
    "decodes": ([1, 1, 1, 1], [1, 16, 17, 70]),
    "mixed": ([1, 33, 1, 7, 1], [20, 50, 1, 7, 65]),
}
OPTIONS = [(None, None), (24, None), (None, 5.0), (10, 5.0)]  # (window, softcap)


def _check_paged(module, batch, dtype, window=None, softcap=None) -> None:
    expected = _reference(batch, window, softcap)
    with poisoned_allocations():
        out = module.paged_attention(
            batch.q, batch.k_cache, batch.v_cache, batch.block_tables,
            batch.query_start_loc, batch.seq_lens, batch.scale,
            max_query_len=batch.max_query_len, window=window, softcap=softcap,
            k_scale=batch.k_scale, v_scale=batch.v_scale,
        )  # fmt: skip
    assert out.shape == batch.q.shape and out.dtype == dtype
    assert worst_head_err(out, expected, batch.k_cache.shape[2]) < TOLERANCE[dtype]


def _check_decode(module, batch, dtype, num_splits, window=None, softcap=None) -> None:
    expected = _reference(batch, window, softcap)
    with poisoned_allocations():
        out = module.decode_attention(
            batch.q, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens,
            batch.scale, num_splits=num_splits, window=window, softcap=softcap,
            k_scale=batch.k_scale, v_scale=batch.v_scale,
        )  # fmt: skip
    assert out.shape == batch.q.shape and out.dtype == dtype
    assert worst_head_err(out, expected, batch.k_cache.shape[2]) < TOLERANCE[dtype]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", sorted(PAGED_CASES))
@pytest.mark.parametrize("heads", [(8, 4), (9, 3)])
# bfloat16 queries run their products in float16 over an fp8 cache (scaled_query)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_paged_attention_matches_reference_interpreted(interpreted, case, heads, dtype):
    batch = fp8_batch(make_paged_batch(*PAGED_CASES[case], *heads, 64, dtype=dtype, device="cpu"))
    _check_paged(interpreted.paged_attention, batch, dtype)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("window", "softcap"), OPTIONS)
def test_paged_attention_window_and_softcap_interpreted(interpreted, window, softcap):
    batch = fp8_batch(
        make_paged_batch(*PAGED_CASES["mixed"], 8, 4, 64, dtype=torch.float32, device="cpu")
    )
    _check_paged(interpreted.paged_attention, batch, torch.float32, window, softcap)


DECODE_LENS = [1, 17, 64, 100, 190]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_decode_attention_matches_reference_interpreted(interpreted, num_splits, dtype):
    batch = fp8_batch(
        make_paged_batch(
            [1] * len(DECODE_LENS), DECODE_LENS, 8, 4, 64, dtype=dtype, device="cpu"
        )  # fmt: skip
    )
    _check_decode(interpreted.decode_attention, batch, dtype, num_splits)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("window", "softcap"), OPTIONS[1:])
def test_decode_attention_window_and_softcap_interpreted(interpreted, window, softcap):
    batch = fp8_batch(
        make_paged_batch(
            [1] * len(DECODE_LENS), DECODE_LENS, 8, 4, 64, dtype=torch.float32, device="cpu"
        )  # fmt: skip
    )
    _check_decode(interpreted.decode_attention, batch, torch.float32, 3, window, softcap)


@pytest.mark.timeout(60)
def test_bfloat16_queries_past_float16_range_interpreted(interpreted):
    """Products over an fp8 cache run in float16 (scaled_query): bfloat16 query rows of
    10^5 to 10^7 (float16 ends at 65504) with the softmax scale shrunk to match, so the
    scores are the usual ones, must give the reference's output, not inf or NaN."""
    batch = fp8_batch(
        make_paged_batch(*PAGED_CASES["mixed"], 8, 4, 64, dtype=torch.bfloat16, device="cpu")
    )
    batch.q.mul_(2.0**17)
    batch.scale *= 2.0**-17
    assert batch.q.abs().amax() > 65504
    _check_paged(interpreted.paged_attention, batch, torch.bfloat16)
    decodes = fp8_batch(
        make_paged_batch(
            [1] * len(DECODE_LENS), DECODE_LENS, 8, 4, 64, dtype=torch.bfloat16, device="cpu"
        )  # fmt: skip
    )
    decodes.q.mul_(2.0**17)
    decodes.scale *= 2.0**-17
    _check_decode(interpreted.decode_attention, decodes, torch.bfloat16, 3)


def test_an_fp8_cache_without_scales_is_refused(interpreted):
    batch = fp8_batch(make_paged_batch([1], [5], 2, 2, 64, dtype=torch.float32, device="cpu"))
    with pytest.raises(AssertionError, match="scales"):
        interpreted.paged_attention.paged_attention(
            batch.q, batch.k_cache, batch.v_cache, batch.block_tables,
            batch.query_start_loc, batch.seq_lens, batch.scale, max_query_len=1,
        )  # fmt: skip


# ---- on the GPU ---------------------------------------------------------------------------

GPU_SHAPES = [(32, 8, 128), (9, 3, 64), (32, 32, 128), (8, 1, 256)]  # (Hq, Hkv, D)
GPU_CASES = {
    **PAGED_CASES,
    "prompts": ([7, 16, 33], [7, 16, 33]),
    "split_fuse": ([300, 1, 1, 1, 200], [1500, 4000, 17, 2048, 200]),
    "many_decodes": ([1] * 64, list(range(100, 6500, 100))),
}


@pytest.mark.gpu
@pytest.mark.parametrize("rotary", [True, False])
@pytest.mark.parametrize("shape", GPU_SHAPES[:3], ids=str)
def test_write_matches_reference_gpu(compiled, rotary, shape):
    inputs = _write_inputs(1000, *shape, torch.bfloat16, "cuda", rotary)
    _check_write(compiled.rope_kv_write, inputs, torch.bfloat16, interpreter=False)


@pytest.mark.gpu
def test_write_with_partial_rotary_gpu(compiled):
    inputs = _write_inputs(1000, 32, 32, 80, torch.bfloat16, "cuda", True, rotary_dim=32)
    _check_write(compiled.rope_kv_write, inputs, torch.bfloat16, interpreter=False)


@pytest.mark.gpu
@pytest.mark.parametrize("case", sorted(GPU_CASES))
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
def test_paged_attention_matches_reference_gpu(compiled, case, shape):
    batch = make_paged_batch(*GPU_CASES[case], *shape, dtype=torch.bfloat16, device="cuda")
    _check_paged(compiled.paged_attention, fp8_batch(batch), torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize(("window", "softcap"), OPTIONS)
@pytest.mark.parametrize("shape", [GPU_SHAPES[0], GPU_SHAPES[3]], ids=str)
def test_window_and_softcap_match_reference_gpu(compiled, window, softcap, shape):
    batch = make_paged_batch(*GPU_CASES["split_fuse"], *shape, dtype=torch.bfloat16,
                             device="cuda")  # fmt: skip
    batch = fp8_batch(batch)
    window = window and 100 * window  # windows shorter than the contexts
    _check_paged(compiled.paged_attention, batch, torch.bfloat16, window, softcap)
    lens = [1, 15, 300, 1000, 4097, 8000]
    batch = fp8_batch(
        make_paged_batch([1] * len(lens), lens, *shape, dtype=torch.bfloat16, device="cuda")
    )
    for splits in (None, 1, 16):
        _check_decode(compiled.decode_attention, batch, torch.bfloat16, splits, window, softcap)


@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", [None, 1, 5, 16, 64])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
def test_decode_attention_matches_reference_gpu(compiled, num_splits, shape):
    lens = [1, 15, 16, 17, 300, 1000, 4097, 8000]
    batch = make_paged_batch([1] * len(lens), lens, *shape, dtype=torch.bfloat16, device="cuda")
    _check_decode(compiled.decode_attention, fp8_batch(batch), torch.bfloat16, num_splits)


@pytest.mark.gpu
def test_fp8_attention_is_close_to_bf16_attention_gpu(compiled):
    """What the halved cache costs: the kernels over fp8 against the kernels over bf16."""
    batch = make_paged_batch(*GPU_CASES["split_fuse"], 32, 8, 128, dtype=torch.bfloat16,
                             device="cuda")  # fmt: skip
    fp8 = fp8_batch(batch)
    args = (batch.block_tables, batch.query_start_loc, batch.seq_lens, batch.scale)
    full = compiled.paged_attention.paged_attention(
        batch.q, fp8.k_full, fp8.v_full, *args, max_query_len=batch.max_query_len
    )
    got = compiled.paged_attention.paged_attention(
        batch.q, fp8.k_cache, fp8.v_cache, *args, max_query_len=batch.max_query_len,
        k_scale=fp8.k_scale, v_scale=fp8.v_scale,
    )  # fmt: skip
    assert _cosine(got, full) >= 0.99 and worst_head_err(got, full, 8) < 0.06

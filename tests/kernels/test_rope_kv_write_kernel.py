"""Fused rotary + paged cache write against `rope_kv_write_ref`."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import TOLERANCE, rel_err

from mii.kernels.torch_ref import rope_kv_write_ref


def _inputs(tokens, q_heads, kv_heads, head_dim, dtype, device, rotary, seed=0, rotary_dim=None):
    """q, k, v as views of one fused qkv buffer; every third slot negative (padding).
    `rotary_dim`: the rotary width (partial rotary below head_dim)."""
    gen = torch.Generator().manual_seed(seed)
    block_size, num_blocks = 16, -(-tokens // 16) + 2
    qkv = torch.randn(tokens, q_heads + 2 * kv_heads, head_dim, generator=gen)
    cache_shape = (num_blocks, block_size, kv_heads, head_dim)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens]
    slots[::3] = -1
    max_pos = 4 * tokens + 8
    angles = torch.rand(max_pos, (rotary_dim or head_dim) // 2, generator=gen) * 6.3
    return dict(
        qkv=qkv.to(device=device, dtype=dtype),
        heads=(q_heads, kv_heads),
        positions=torch.randint(0, max_pos, (tokens,), generator=gen).to(device),
        cos_sin_cache=torch.cat((angles.cos(), angles.sin()), -1).to(device) if rotary else None,
        k_cache=torch.randn(cache_shape, generator=gen).to(device=device, dtype=dtype),
        v_cache=torch.randn(cache_shape, generator=gen).to(device=device, dtype=dtype),
        slot_mapping=slots.to(device),
    )


def _run(fn, inputs):
    """Run on private copies; returns the tensors the call may change."""
    qkv = inputs["qkv"].clone()
    q_heads, kv_heads = inputs["heads"]
    q, k, v = qkv.split([q_heads, kv_heads, kv_heads], dim=1)  # strided (T, H, D) views
    k_cache, v_cache = inputs["k_cache"].clone(), inputs["v_cache"].clone()
    fn(q, k, v, inputs["positions"], inputs["cos_sin_cache"], k_cache, v_cache,
       inputs["slot_mapping"])  # fmt: skip
    return {"qkv": qkv, "k_cache": k_cache, "v_cache": v_cache}


def _check(module, inputs, dtype):
    expected = _run(rope_kv_write_ref, inputs)
    actual = _run(module.rope_kv_write, inputs)
    for name, tensor in expected.items():  # whole tensors: untouched parts must stay put
        assert rel_err(actual[name], tensor) < TOLERANCE[dtype], name


@pytest.mark.timeout(60)
@pytest.mark.parametrize("rotary", [True, False])
@pytest.mark.parametrize("heads", [(8, 2), (9, 3), (4, 4)])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_reference_interpreted(interpreted, rotary, heads, head_dim, dtype):
    inputs = _inputs(37, *heads, head_dim, dtype, "cpu", rotary)
    _check(interpreted.rope_kv_write, inputs, dtype)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("rotary_dim", [32, 26, 2])  # Phi-2 turns 32 of 80 dims
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_partial_rotary_interpreted(interpreted, rotary_dim, dtype):
    inputs = _inputs(23, 8, 2, 80, dtype, "cpu", True, rotary_dim=rotary_dim)
    _check(interpreted.rope_kv_write, inputs, dtype)
    # the dims past the rotary ones pass through, in q and in the cache
    after = _run(rope_kv_write_ref, inputs)["qkv"]
    assert torch.equal(after[..., rotary_dim:], inputs["qkv"][..., rotary_dim:])
    assert not torch.equal(after[..., :rotary_dim], inputs["qkv"][..., :rotary_dim])


GPU_SHAPES = [  # (q heads, kv heads, head_dim, dtype)
    (32, 8, 128, torch.bfloat16),
    (9, 3, 64, torch.bfloat16),
    (32, 32, 128, torch.bfloat16),
    (32, 8, 128, torch.float16),
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("head_dim", [8, 80])  # tiny test models; not a power of two
def test_small_and_uneven_head_dims_interpreted(interpreted, head_dim):
    inputs = _inputs(19, 9, 3, head_dim, torch.float32, "cpu", True)
    _check(interpreted.rope_kv_write, inputs, torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("rotary", [True, False])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
def test_matches_reference_gpu(compiled, rotary, shape):
    *heads, head_dim, dtype = shape
    inputs = _inputs(1000, *heads, head_dim, dtype, "cuda", rotary)
    _check(compiled.rope_kv_write, inputs, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(32, 32, 80, 32), (24, 8, 128, 96)], ids=str)  # Phi-2, -4-mini
def test_partial_rotary_gpu(compiled, shape):
    *heads, head_dim, rotary_dim = shape
    inputs = _inputs(1000, *heads, head_dim, torch.bfloat16, "cuda", True, rotary_dim=rotary_dim)
    _check(compiled.rope_kv_write, inputs, torch.bfloat16)

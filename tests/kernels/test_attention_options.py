"""Sliding-window attention and score soft-capping: the torch reference against a dense
per-sequence computation written from the definition, then both Triton attention kernels
(ragged and split-K decode) against the reference: interpreter on CPU, GPU in bf16."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import TOLERANCE, make_paged_batch, poisoned_allocations, rel_err

from mii.kernels.torch_ref import paged_attention_ref

# (q_lens, seq_lens): chunks whose rows straddle the window's edge, decodes far past it,
# a sequence shorter than the window, a chunk longer than the window.
CASES = {
    "mixed": ([1, 33, 1, 7, 1], [20, 90, 1, 7, 130]),
    "long_chunk": ([100, 1], [140, 200]),
    "decodes": ([1, 1, 1, 1], [5, 40, 64, 190]),
}
OPTIONS = {  # window, softcap
    "window": (24, None),
    "window1": (1, None),  # each query sees itself only
    "softcap": (None, 2.0),  # small, so that the cap changes the scores a lot
    "both": (37, 5.0),
}


def dense_attention(batch, window, softcap):
    """Each sequence alone, its context gathered and its mask built key by key."""
    q, k_cache, v_cache = batch.q.double(), batch.k_cache.double(), batch.v_cache.double()
    block_size = k_cache.shape[1]
    out = torch.empty_like(q)
    starts = batch.query_start_loc.tolist()
    for i, seq_len in enumerate(batch.seq_lens.tolist()):
        pos = torch.arange(seq_len)
        blocks = batch.block_tables[i][pos // block_size].long()
        k = k_cache[blocks, pos % block_size]  # (L, Hkv, D)
        v = v_cache[blocks, pos % block_size]
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
        rows = slice(starts[i], starts[i + 1])
        q_pos = torch.arange(seq_len - (starts[i + 1] - starts[i]), seq_len)
        scores = torch.einsum("qhd,khd->hqk", q[rows], k) * batch.scale
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        visible = pos[None, :] <= q_pos[:, None]
        if window is not None:
            visible &= pos[None, :] > q_pos[:, None] - window
        scores = scores.masked_fill(~visible, float("-inf"))
        out[rows] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)
    return out


def reference(batch, window, softcap):
    return paged_attention_ref(
        batch.q, batch.k_cache, batch.v_cache, batch.block_tables, batch.query_start_loc,
        batch.seq_lens, batch.scale, window=window, softcap=softcap,
    )  # fmt: skip


@pytest.mark.timeout(60)
@pytest.mark.parametrize("option", sorted(OPTIONS))
@pytest.mark.parametrize("case", sorted(CASES))
def test_reference_matches_the_definition(case, option):
    window, softcap = OPTIONS[option]
    batch = make_paged_batch(*CASES[case], 8, 2, 16, dtype=torch.float32, device="cpu")
    got = reference(batch, window, softcap)
    assert rel_err(got, dense_attention(batch, window, softcap)) < 1e-5
    # and the option matters: without it the result is far off
    assert rel_err(reference(batch, None, None), got) > 1e-2


def _ragged(module, batch, window, softcap):
    return module.paged_attention(
        batch.q, batch.k_cache, batch.v_cache, batch.block_tables, batch.query_start_loc,
        batch.seq_lens, batch.scale, max_query_len=batch.max_query_len, window=window,
        softcap=softcap,
    )  # fmt: skip


def _decode(module, batch, window, softcap, num_splits):
    return module.decode_attention(
        batch.q, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens,
        batch.scale, num_splits=num_splits, window=window, softcap=softcap,
    )  # fmt: skip


def _check(out, batch, window, softcap, dtype):
    assert out.shape == batch.q.shape and out.dtype == dtype
    assert rel_err(out, reference(batch, window, softcap)) < TOLERANCE[dtype]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("option", sorted(OPTIONS))
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_ragged_kernel_interpreted(interpreted, case, option, dtype):
    window, softcap = OPTIONS[option]
    batch = make_paged_batch(*CASES[case], 8, 2, 64, dtype=dtype, device="cpu")
    with poisoned_allocations():
        out = _ragged(interpreted.paged_attention, batch, window, softcap)
    _check(out, batch, window, softcap, dtype)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("num_splits", [1, 3, 8])
@pytest.mark.parametrize("option", sorted(OPTIONS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_kernel_interpreted(interpreted, num_splits, option, dtype):
    window, softcap = OPTIONS[option]
    seq_lens = [1, 17, 64, 100, 190]
    batch = make_paged_batch([1] * 5, seq_lens, 8, 2, 64, dtype=dtype, device="cpu")
    with poisoned_allocations():
        out = _decode(interpreted.decode_attention, batch, window, softcap, num_splits)
    _check(out, batch, window, softcap, dtype)


@pytest.mark.timeout(60)
def test_window_reads_no_block_before_it_interpreted(interpreted):
    """Blocks wholly before every query's window may hold anything (the block manager has
    freed them): NaN there must not reach the output."""
    batch = make_paged_batch([1, 20], [300, 250], 8, 2, 64, dtype=torch.float32, device="cpu")
    expected = reference(batch, 40, None)
    for i, seq_len in enumerate(batch.seq_lens.tolist()):
        gone = (seq_len - 20 - 40 - 64) // 16  # blocks before the window, a tile to spare
        batch.k_cache[batch.block_tables[i, :gone].long()] = float("nan")
        batch.v_cache[batch.block_tables[i, :gone].long()] = float("nan")
    assert rel_err(_ragged(interpreted.paged_attention, batch, 40, None), expected) < 1e-4
    decode = make_paged_batch([1], [300], 8, 2, 64, dtype=torch.float32, device="cpu")
    expected = reference(decode, 40, None)
    decode.k_cache[decode.block_tables[0, :14].long()] = float("nan")
    out = _decode(interpreted.decode_attention, decode, 40, None, 4)
    assert rel_err(out, expected) < 1e-4


@pytest.mark.timeout(120)
def test_gemma_heads_of_256_interpreted(interpreted):
    """Heads of 256 take their own (narrower) tiles."""
    batch = make_paged_batch(*CASES["mixed"], 4, 2, 256, dtype=torch.float32, device="cpu")
    _check(_ragged(interpreted.paged_attention, batch, 37, 5.0), batch, 37, 5.0, torch.float32)
    decode = make_paged_batch([1] * 3, [9, 100, 190], 4, 2, 256, dtype=torch.float32,
                              device="cpu")  # fmt: skip
    out = _decode(interpreted.decode_attention, decode, 37, 5.0, 3)
    _check(out, decode, 37, 5.0, torch.float32)


GPU_SHAPES = [  # (q heads, kv heads, head_dim)
    (32, 8, 128),  # Mistral-7B
    (16, 8, 256),  # Gemma-2-9B
    (9, 3, 64),
]


@pytest.mark.gpu
@pytest.mark.parametrize("option", sorted(OPTIONS))
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
def test_ragged_kernel_gpu(compiled, option, shape):
    window, softcap = OPTIONS[option]
    q_lens, seq_lens = [1, 300, 1, 77, 1], [4097, 300, 9000, 2000, 1]
    batch = make_paged_batch(q_lens, seq_lens, *shape, dtype=torch.bfloat16, device="cuda")
    out = _ragged(compiled.paged_attention, batch, window and window * 40, softcap)
    _check(out, batch, window and window * 40, softcap, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", [None, 1, 5, 64])
@pytest.mark.parametrize("option", sorted(OPTIONS))
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
def test_decode_kernel_gpu(compiled, num_splits, option, shape):
    window, softcap = OPTIONS[option]
    seq_lens = [1, 15, 17, 300, 1000, 4097, 16000]
    batch = make_paged_batch([1] * 7, seq_lens, *shape, dtype=torch.bfloat16, device="cuda")
    out = _decode(compiled.decode_attention, batch, window and window * 170, softcap, num_splits)
    _check(out, batch, window and window * 170, softcap, torch.bfloat16)

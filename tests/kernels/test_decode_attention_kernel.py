"""Split-K decode attention against `paged_attention_ref` with every query length 1."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import TOLERANCE, make_paged_batch, poisoned_allocations, rel_err

from mii.kernels.torch_ref import paged_attention_ref

GROUPS = {1: (2, 2), 4: (8, 2), 8: (8, 1), 3: (9, 3)}  # group -> (q heads, kv heads)
SEQ_LENS = [1, 17, 64, 100, 190]  # one token, partial blocks and tiles, several tiles


def _check(module, batch, dtype, num_splits) -> None:
    expected = paged_attention_ref(
        batch.q, batch.k_cache, batch.v_cache, batch.block_tables,
        batch.query_start_loc, batch.seq_lens, batch.scale,
    )  # fmt: skip
    with poisoned_allocations():
        out = module.decode_attention(
            batch.q, batch.k_cache, batch.v_cache, batch.block_tables, batch.seq_lens,
            batch.scale, num_splits=num_splits,
        )  # fmt: skip
    assert out.shape == batch.q.shape and out.dtype == dtype
    assert rel_err(out, expected) < TOLERANCE[dtype]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("num_splits", [None, 1, 3, 8])  # 8: more splits than tiles
@pytest.mark.parametrize("group", sorted(GROUPS))
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_reference_interpreted(interpreted, num_splits, group, head_dim, dtype):
    batch = make_paged_batch(
        [1] * len(SEQ_LENS), SEQ_LENS, *GROUPS[group], head_dim, dtype=dtype, device="cpu"
    )
    _check(interpreted.decode_attention, batch, dtype, num_splits)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("head_dim", [8, 80])  # tiny test models; not a power of two
def test_small_and_uneven_head_dims_interpreted(interpreted, head_dim):
    batch = make_paged_batch(
        [1] * len(SEQ_LENS), SEQ_LENS, 8, 2, head_dim, dtype=torch.float32, device="cpu"
    )
    _check(interpreted.decode_attention, batch, torch.float32, 3)


@pytest.mark.timeout(120)
@pytest.mark.parametrize("num_splits", [16, 70])
@pytest.mark.parametrize("group", [1, 8])
def test_many_splits_most_of_them_empty_interpreted(interpreted, num_splits, group):
    """Short sequences over many splits: most splits have no key (lse -inf, weight 0 in
    the merge)."""
    batch = make_paged_batch(
        [1] * 4, [1, 5, 33, 200], *GROUPS[group], 64, dtype=torch.float32, device="cpu"
    )
    _check(interpreted.decode_attention, batch, torch.float32, num_splits)


def test_default_splits_fill_the_gpu_without_tiny_splits(interpreted):
    splits = interpreted.decode_attention.default_num_splits
    assert splits(batch=64, kv_heads=8, max_context=4096, sm_count=132) == 1
    assert splits(batch=8, kv_heads=8, max_context=4096, sm_count=132) == 8
    assert splits(batch=1, kv_heads=8, max_context=4096, sm_count=132) == 32
    assert splits(batch=1, kv_heads=8, max_context=256, sm_count=132) == 2
    assert splits(batch=1, kv_heads=8, max_context=100, sm_count=132) == 1


GPU_SHAPES = [  # (q heads, kv heads, head_dim, dtype)
    (32, 8, 128, torch.bfloat16),
    (32, 32, 128, torch.bfloat16),
    (32, 4, 128, torch.bfloat16),
    (9, 3, 64, torch.bfloat16),
    (32, 8, 128, torch.float16),
]


@pytest.mark.gpu
@pytest.mark.parametrize("num_splits", [None, 1, 5, 16, 64])
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
def test_matches_reference_gpu(compiled, num_splits, shape):
    *heads, head_dim, dtype = shape
    seq_lens = [1, 15, 16, 17, 300, 1000, 4097, 8000]
    batch = make_paged_batch([1] * len(seq_lens), seq_lens, *heads, head_dim, dtype=dtype,
                             device="cuda")  # fmt: skip
    _check(compiled.decode_attention, batch, dtype, num_splits)

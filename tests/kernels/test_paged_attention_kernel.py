"""Ragged paged attention against `paged_attention_ref`: interpreter on CPU, GPU in bf16."""

from __future__ import annotations

import pytest
import torch
from kernel_testing import TOLERANCE, make_paged_batch, poisoned_allocations, rel_err

from mii.kernels.dispatch import split_prompts
from mii.kernels.torch_ref import paged_attention_ref

# (q_lens, seq_lens): each sequence's query tokens sit at the end of its context.
CASES = {
    "decodes": ([1, 1, 1, 1], [1, 16, 17, 70]),
    "prompts": ([7, 16, 33], [7, 16, 33]),
    "chunks_after_prefix": ([16, 7], [40, 64]),
    "mixed": ([1, 33, 1, 7, 1], [20, 50, 1, 7, 65]),
    "budget_chunk": ([128, 1], [140, 30]),
}
GROUPS = {1: (2, 2), 4: (8, 2), 8: (8, 1)}  # group -> (q heads, kv heads)


def _check(kernels_module, batch, dtype, num_decodes=0) -> None:
    """`num_decodes`: the leading one-token sequences go to the split-K decode kernel."""
    expected = paged_attention_ref(
        batch.q, batch.k_cache, batch.v_cache, batch.block_tables,
        batch.query_start_loc, batch.seq_lens, batch.scale,
    )  # fmt: skip
    split = {}
    if num_decodes:
        prompts = split_prompts(
            batch.block_tables, batch.query_start_loc, batch.seq_lens, num_decodes
        )
        split = {"num_decodes": num_decodes, "prompts": prompts}
    with poisoned_allocations():
        out = kernels_module.paged_attention(
            batch.q, batch.k_cache, batch.v_cache, batch.block_tables,
            batch.query_start_loc, batch.seq_lens, batch.scale,
            max_query_len=batch.max_query_len, **split,
        )  # fmt: skip
    assert out.shape == batch.q.shape and out.dtype == dtype
    assert rel_err(out, expected) < TOLERANCE[dtype]
    if num_decodes:  # each part on its own: a part left unwritten shows in its rows
        tokens = num_decodes
        assert rel_err(out[:tokens], expected[:tokens]) < TOLERANCE[dtype]
        assert rel_err(out[tokens:], expected[tokens:]) < TOLERANCE[dtype]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("group", sorted(GROUPS))
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_reference_interpreted(interpreted, case, group, head_dim, dtype):
    q_lens, seq_lens = CASES[case]
    q_heads, kv_heads = GROUPS[group]
    batch = make_paged_batch(
        q_lens, seq_lens, q_heads, kv_heads, head_dim, dtype=dtype, device="cpu"
    )
    _check(interpreted.paged_attention, batch, dtype)


# (q_lens, seq_lens, leading one-token sequences): a SplitFuse step, decodes first
SPLIT_CASES = {
    "decodes_then_chunks": ([1, 1, 1, 33, 7], [20, 1, 65, 50, 7], 3),
    "one_decode_then_a_chunk_of_one": ([1, 1, 16], [40, 3, 16], 2),
}


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", sorted(SPLIT_CASES))
@pytest.mark.parametrize("group", [1, 4])
def test_mixed_step_with_decodes_apart_interpreted(interpreted, case, group):
    """The decodes through the split-K kernel, the chunks through the ragged one: the same
    result as one launch over the step."""
    q_lens, seq_lens, decodes = SPLIT_CASES[case]
    q_heads, kv_heads = GROUPS[group]
    batch = make_paged_batch(q_lens, seq_lens, q_heads, kv_heads, 64, dtype=torch.float32,
                             device="cpu")  # fmt: skip
    _check(interpreted.paged_attention, batch, torch.float32, num_decodes=decodes)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("block_size", [8, 32])
def test_smollm_heads_and_other_block_sizes_interpreted(interpreted, block_size):
    """Group 3 (SmolLM2's 9 q / 3 kv heads): packed rows straddle tile edges."""
    batch = make_paged_batch(
        [1, 21, 5], [9, 40, 5], 9, 3, 64, block_size=block_size, dtype=torch.float32,
        device="cpu",
    )  # fmt: skip
    _check(interpreted.paged_attention, batch, torch.float32)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("head_dim", [8, 16, 80])  # tiny test models; not a power of two
def test_small_and_uneven_head_dims_interpreted(interpreted, head_dim):
    q_lens, seq_lens = CASES["mixed"]
    batch = make_paged_batch(q_lens, seq_lens, 8, 2, head_dim, dtype=torch.float32, device="cpu")
    _check(interpreted.paged_attention, batch, torch.float32)


GPU_CASES = {
    **CASES,
    "long_prompt": ([512], [512]),
    "split_fuse": ([300, 1, 1, 1, 200], [1500, 4000, 17, 2048, 200]),
    "many_decodes": ([1] * 64, list(range(100, 6500, 100))),
}


# (q heads, kv heads, head_dim, dtype): each compiles its own kernels, so a few suffice.
GPU_SHAPES = [
    (32, 8, 128, torch.bfloat16),
    (32, 32, 128, torch.bfloat16),
    (32, 4, 128, torch.bfloat16),
    (9, 3, 64, torch.bfloat16),
    (12, 12, 64, torch.bfloat16),
    (32, 8, 128, torch.float16),
]


@pytest.mark.gpu
@pytest.mark.parametrize("case", sorted(GPU_CASES))
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
def test_matches_reference_gpu(compiled, case, shape):
    *heads, head_dim, dtype = shape
    q_lens, seq_lens = GPU_CASES[case]
    batch = make_paged_batch(q_lens, seq_lens, *heads, head_dim, dtype=dtype, device="cuda")
    _check(compiled.paged_attention, batch, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", GPU_SHAPES[:4], ids=str)
def test_mixed_step_with_decodes_apart_gpu(compiled, shape):
    *heads, head_dim, dtype = shape
    q_lens = [1] * 40 + [300, 7, 200]
    seq_lens = list(range(50, 4050, 100)) + [1500, 7, 200]
    batch = make_paged_batch(q_lens, seq_lens, *heads, head_dim, dtype=dtype, device="cuda")
    _check(compiled.paged_attention, batch, dtype, num_decodes=40)


def test_a_block_table_narrower_than_the_chunk_is_refused(interpreted):
    batch = make_paged_batch([40], [40], 2, 2, 64, dtype=torch.float32, device="cpu")
    with pytest.raises(AssertionError, match="too narrow"):
        interpreted.paged_attention.paged_attention(
            batch.q, batch.k_cache, batch.v_cache, batch.block_tables[:, :1],
            batch.query_start_loc, batch.seq_lens, batch.scale, max_query_len=40,
        )  # fmt: skip

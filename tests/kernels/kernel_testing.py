"""Helpers of the kernel tests: random paged batches, poisoned allocations, error norms."""

from __future__ import annotations

import contextlib
from types import SimpleNamespace

import torch


@contextlib.contextmanager
def poisoned_allocations():
    """torch.empty fills float tensors with NaN (and ints with their max) inside: an
    output element the kernel forgets to write shows up as NaN."""
    was = torch.are_deterministic_algorithms_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was)
        torch.utils.deterministic.fill_uninitialized_memory = fill


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """||actual - expected|| / ||expected|| in fp64; inf when actual holds a NaN."""
    if not torch.isfinite(actual).all():
        return float("inf")
    a, e = actual.double(), expected.double()
    return ((a - e).norm() / e.norm().clamp_min(1e-30)).item()


TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def make_paged_batch(
    q_lens, seq_lens, q_heads, kv_heads, head_dim, *, block_size=16, dtype, device, seed=0
) -> SimpleNamespace:
    """A random ragged step over a random paged cache.

    Sequence i has q_lens[i] query tokens at the end of a context of seq_lens[i]. Blocks
    are handed out in shuffled order, table rows are padded with other valid block ids
    (never read for real), and q is a strided view of a wider fused qkv buffer as the
    models pass it.
    """
    gen = torch.Generator().manual_seed(seed)
    blocks_per_seq = [-(-n // block_size) for n in seq_lens]
    width = max(blocks_per_seq) + 1
    num_blocks = sum(blocks_per_seq) + 3
    order = torch.randperm(num_blocks, generator=gen).to(torch.int32)
    tables = torch.randint(0, num_blocks, (len(q_lens), width), generator=gen, dtype=torch.int32)
    used = 0
    for i, n in enumerate(blocks_per_seq):
        tables[i, :n] = order[used : used + n]
        used += n
    tokens = sum(q_lens)
    qkv = torch.randn(tokens, q_heads + 2 * kv_heads, head_dim, generator=gen)
    cache_shape = (num_blocks, block_size, kv_heads, head_dim)
    starts = torch.tensor([0, *q_lens], dtype=torch.int32).cumsum(0).to(torch.int32)

    def put(t: torch.Tensor) -> torch.Tensor:
        return t.to(device=device, dtype=dtype)

    return SimpleNamespace(
        q=put(qkv)[:, :q_heads],  # (T, Hq, D) view with the fused row stride
        k_cache=put(torch.randn(cache_shape, generator=gen)),
        v_cache=put(torch.randn(cache_shape, generator=gen)),
        block_tables=tables.to(device),
        query_start_loc=starts.to(device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        max_query_len=max(q_lens),
        scale=head_dim**-0.5,
    )

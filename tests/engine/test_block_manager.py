"""Block allocator: reference counts, prefix reuse, eviction order, no leaks."""

from __future__ import annotations

import pytest

from mii.engine.block_manager import BlockManager
from mii.engine.sampling_params import SamplingParams
from mii.engine.sequence import Sequence

BS = 4


def seq(tokens, rid="r", arrival=0) -> Sequence:
    return Sequence(rid, list(tokens), SamplingParams(max_new_tokens=8), arrival)


def compute(bm: BlockManager, s: Sequence, n: int) -> None:
    """What a step does: allocate for n tokens, compute them, seal full blocks."""
    bm.allocate(s, n)
    s.num_computed_tokens += n
    bm.seal_computed_blocks(s)


def test_allocate_rounds_up_to_blocks_and_free_returns_them():
    bm = BlockManager(num_blocks=10, block_size=BS)
    s = seq(range(9))
    assert bm.blocks_needed(s, 9) == 3
    compute(bm, s, 9)
    assert len(s.block_table) == 3 and bm.num_free_blocks == 7
    bm.free(s)
    assert bm.num_free_blocks == 10 and s.block_table == [] and s.num_computed_tokens == 0


def test_allocation_beyond_capacity_raises():
    bm = BlockManager(num_blocks=2, block_size=BS)
    s = seq(range(12))
    assert not bm.can_allocate(s, 12)
    with pytest.raises(RuntimeError, match="out of KV blocks"):
        bm.allocate(s, 12)


def test_shared_prefix_reuses_sealed_blocks_with_reference_counts():
    bm = BlockManager(num_blocks=10, block_size=BS)
    a = seq([1, 2, 3, 4, 5, 6, 7, 8, 9, 10], "a")
    compute(bm, a, 10)
    b = seq([1, 2, 3, 4, 5, 6, 7, 8, 99], "b")
    assert bm.reuse_cached_prefix(b) == 8
    assert b.block_table == a.block_table[:2]
    assert [bm.blocks[i].ref_count for i in b.block_table] == [2, 2]
    bm.free(a)
    assert [bm.blocks[i].ref_count for i in b.block_table] == [1, 1]
    bm.free(b)
    assert bm.num_free_blocks == 10


def test_the_last_prompt_token_is_always_left_to_compute():
    bm = BlockManager(num_blocks=10, block_size=BS)
    a = seq(range(8), "a")
    compute(bm, a, 8)
    b = seq(range(8), "b")  # the same 8 tokens: two full cached blocks
    assert bm.reuse_cached_prefix(b) == 4  # the second block holds the last token


def test_different_prefix_does_not_match_even_with_equal_second_block():
    bm = BlockManager(num_blocks=10, block_size=BS)
    compute(bm, a := seq([1, 1, 1, 1, 2, 2, 2, 2, 3], "a"), 9)
    b = seq([9, 9, 9, 9, 2, 2, 2, 2, 3], "b")
    assert bm.reuse_cached_prefix(b) == 0
    assert a.block_table


def test_freed_cached_blocks_are_revived_until_reused():
    bm = BlockManager(num_blocks=3, block_size=BS)
    a = seq([1, 2, 3, 4, 5], "a")
    compute(bm, a, 5)
    bm.free(a)
    b = seq([1, 2, 3, 4, 6], "b")
    assert bm.reuse_cached_prefix(b) == 4  # the freed block still holds [1, 2, 3, 4]
    bm.free(b)
    # Fill the whole cache with other tokens: the cached block is evicted and forgotten.
    c = seq(range(100, 112), "c")
    compute(bm, c, 12)
    bm.free(c)
    d = seq([1, 2, 3, 4, 7], "d")
    assert bm.reuse_cached_prefix(d) == 0


def test_free_puts_the_tail_first_in_line_for_eviction():
    bm = BlockManager(num_blocks=4, block_size=BS)
    a = seq(range(12), "a")
    compute(bm, a, 12)
    first, _, last = a.block_table
    bm.free(a)
    order = list(bm.free_ids)
    assert order.index(last) < order.index(first)


def test_decode_tokens_seal_blocks_too():
    bm = BlockManager(num_blocks=8, block_size=BS)
    a = seq([1, 2, 3], "a")
    compute(bm, a, 3)
    for t in (4, 5):  # two generated tokens fill the first block and start the second
        a.append_token(t)
        compute(bm, a, 1)
    b = seq([1, 2, 3, 4, 5, 6], "b")
    assert bm.reuse_cached_prefix(b) == 4


def window_step(bm: BlockManager, s: Sequence, n: int) -> None:
    """A step as the scheduler runs it with a sliding window: compute, seal, release."""
    compute(bm, s, n)
    bm.release_out_of_window(s)


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_blocks_that_left_the_window_are_released(prefix_caching):
    bm = BlockManager(num_blocks=10, block_size=BS, enable_prefix_caching=prefix_caching,
                      sliding_window=6)  # fmt: skip
    s = seq(range(30))
    window_step(bm, s, 9)  # next token at 9 sees keys 4..9: block 0 (keys 0..3) is out
    assert s.num_released_blocks == 1 and bm.num_free_blocks == 10 - 2
    window_step(bm, s, 1)  # at 10, keys 5..10: block 1 (4..7) still holds key 5
    assert s.num_released_blocks == 1
    window_step(bm, s, 2)  # at 12, keys 7..12
    assert s.num_released_blocks == 1
    window_step(bm, s, 1)  # at 13, keys 8..13: block 1 is out
    assert s.num_released_blocks == 2
    # A 30-token sequence streams through with at most window + step + 2 blocks held.
    while s.num_computed_tokens < 30:
        window_step(bm, s, min(4, 30 - s.num_computed_tokens))
        assert 10 - bm.num_free_blocks <= -(-(6 + 4) // BS) + 2
    assert len(s.block_table) == 8  # positions keep their table entries
    bm.free(s)  # releases only what it still holds: no double free
    assert bm.num_free_blocks == 10
    assert all(b.ref_count == 0 for b in bm.blocks)


def test_a_shared_prefix_block_stays_while_a_sequence_still_sees_it():
    bm = BlockManager(num_blocks=12, block_size=BS, sliding_window=6)
    a = seq([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14], "a")
    window_step(bm, a, 14)  # blocks 0..2 left a's window
    assert a.num_released_blocks == 2
    b = seq([1, 2, 3, 4, 5, 6, 7, 8, 99], "b")
    assert bm.reuse_cached_prefix(b) == 8  # revived from the free queue, contents intact
    first = b.block_table[0]
    assert bm.blocks[first].ref_count == 1
    window_step(bm, b, 1)  # b at 9 sees keys 4..9: its block 0 is out of its window too
    assert bm.blocks[first].ref_count == 0 and first in bm.free_ids


def test_without_a_window_nothing_is_released():
    bm = BlockManager(num_blocks=10, block_size=BS)
    s = seq(range(30))
    window_step(bm, s, 30)
    assert s.num_released_blocks == 0 and bm.num_free_blocks == 10 - 8

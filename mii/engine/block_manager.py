"""The KV-cache block allocator: fixed-size blocks, reference counts, prefix caching.

A block whose tokens are all computed is *sealed*: it is registered under a hash of its
tokens chained with the hash of the block before it, so a later prompt that starts with
the same tokens reuses it instead of recomputing. Freed blocks keep their contents and
hash; they go to the back of the free queue (least recently used first out) and are
revived if a prefix matches before they are handed out again.

With a sliding window on every layer (Mistral), a block whose tokens all lie before the
window of the sequence's next token is never read again: it is released at once (and
stays revivable as a cached prefix like any freed block).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from mii.engine.sequence import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None
    token_ids: tuple[int, ...] = ()  # the sealed contents, to tell hash collisions apart


def chain_hash(parent: int | None, token_ids: tuple[int, ...]) -> int:
    return hash((parent, token_ids))


class BlockManager:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        sliding_window: int | None = None,
    ):
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError("num_blocks and block_size must be positive")
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.sliding_window = sliding_window
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_ids: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.hash_to_block: dict[int, int] = {}

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_ids)

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """Fresh blocks `seq` needs to hold its computed tokens plus `num_new_tokens`."""
        total = -(-(seq.num_computed_tokens + num_new_tokens) // self.block_size)
        return max(0, total - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.blocks_needed(seq, num_new_tokens) <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        needed = self.blocks_needed(seq, num_new_tokens)
        if needed > self.num_free_blocks:
            raise RuntimeError(f"out of KV blocks: need {needed}, have {self.num_free_blocks}")
        for _ in range(needed):
            seq.block_table.append(self._take_fresh())

    def _take_fresh(self) -> int:
        block_id, _ = self.free_ids.popitem(last=False)
        self._unhash(block_id)
        self.blocks[block_id].ref_count = 1
        return block_id

    def _unhash(self, block_id: int) -> None:
        """The block no longer holds a cached prefix: its hash leaves the lookup (where it
        still points here) and the block keeps no tokens."""
        block = self.blocks[block_id]
        if block.block_hash is not None and self.hash_to_block.get(block.block_hash) == block_id:
            del self.hash_to_block[block.block_hash]
        block.block_hash, block.token_ids = None, ()

    def reuse_cached_prefix(self, seq: Sequence) -> int:
        """Attach the cached blocks that hold a prefix of `seq`; returns tokens reused.

        At least the last token is left to compute, since the step that computes it is
        the one that yields the logits for the next token.
        """
        if not self.enable_prefix_caching or seq.block_table:
            return 0
        parent = None
        usable = (seq.num_tokens - 1) // self.block_size
        for i in range(usable):
            tokens = tuple(seq.token_ids[i * self.block_size : (i + 1) * self.block_size])
            block_hash = chain_hash(parent, tokens)
            block_id = self.hash_to_block.get(block_hash)
            if block_id is None or self.blocks[block_id].token_ids != tokens:
                break
            self._acquire(block_id)
            seq.block_table.append(block_id)
            parent = block_hash
        seq.num_hashed_blocks = len(seq.block_table)
        seq.last_block_hash = parent
        seq.num_computed_tokens = len(seq.block_table) * self.block_size
        return seq.num_computed_tokens

    def forget_cached_prefixes(self) -> None:
        """Drop every cached prefix: free blocks keep no hash for a later prompt to reuse
        (blocks that sequences hold keep theirs)."""
        for block_id in self.free_ids:
            self._unhash(block_id)

    def _acquire(self, block_id: int) -> None:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_ids[block_id]
        block.ref_count += 1

    def seal_computed_blocks(self, seq: Sequence) -> None:
        """Register the hashes of blocks that became full of computed tokens."""
        if not self.enable_prefix_caching:
            return
        known = min(seq.num_computed_tokens, seq.num_known_tokens)  # no PENDING token hashed
        full = min(known // self.block_size, len(seq.block_table))
        for i in range(seq.num_hashed_blocks, full):
            tokens = tuple(seq.token_ids[i * self.block_size : (i + 1) * self.block_size])
            block_hash = chain_hash(seq.last_block_hash, tokens)
            block = self.blocks[seq.block_table[i]]
            if block.block_hash is None:
                block.block_hash, block.token_ids = block_hash, tokens
                self.hash_to_block.setdefault(block_hash, block.block_id)
            seq.last_block_hash = block_hash
        seq.num_hashed_blocks = max(seq.num_hashed_blocks, full)

    def release_out_of_window(self, seq: Sequence) -> int:
        """Release the blocks before the sliding window of `seq`'s next token (position
        `num_computed_tokens`, which sees keys after `position - window`); returns how many."""
        if self.sliding_window is None:
            return 0
        first_needed = seq.num_computed_tokens - self.sliding_window + 1
        releasable = min(max(0, first_needed) // self.block_size, len(seq.block_table))
        if self.enable_prefix_caching:  # hashed first, so a later prompt can revive it
            releasable = min(releasable, seq.num_hashed_blocks)
        released = 0
        while seq.num_released_blocks < releasable:
            self._release(seq.block_table[seq.num_released_blocks])
            seq.num_released_blocks += 1
            released += 1
        return released

    def _release(self, block_id: int) -> None:
        block = self.blocks[block_id]
        block.ref_count -= 1
        if block.ref_count == 0:
            self.free_ids[block_id] = None

    def free(self, seq: Sequence) -> None:
        """Release `seq`'s blocks; its tail goes to the free queue first, so that a shared
        prefix outlives the suffixes that hang from it."""
        for block_id in reversed(seq.block_table[seq.num_released_blocks :]):
            self._release(block_id)
        seq.block_table = []
        seq.num_released_blocks = 0
        seq.num_computed_tokens = 0
        seq.num_hashed_blocks = 0
        seq.last_block_hash = None

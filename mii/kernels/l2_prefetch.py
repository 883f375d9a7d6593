"""Pull a tensor's first bytes into the GPU's L2 cache, without waiting for them.

At batch 1 a decode step reads every weight once, and between the projections run kernels
that barely touch memory (rope, attention over a short context, all-reduces, norms): for
those microseconds HBM idles. A projection's weights prefetched into L2 during such a
window are read from L2 by its GEMV (mii/engine/layers/weight_prefetch.py places the
launches). Each thread issues one Hopper bulk prefetch (`cp.async.bulk.prefetch.L2`, PTX
8.0, sm_90) of CHUNK_BYTES and exits: the kernel ends while the bytes are still arriving.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

CHUNK_BYTES = 65536
"""Bytes per bulk prefetch: 16 MB is 256 instructions, two programs of one warp."""
BLOCK = 32


@triton.jit
def _l2_prefetch_kernel(
    base_ptr, chunks, CHUNK_ELEMS: tl.constexpr, CHUNK_BYTES: tl.constexpr, BLOCK: tl.constexpr
):  # fmt: skip
    i = tl.minimum(tl.program_id(0) * BLOCK + tl.arange(0, BLOCK), chunks - 1)
    addr = (base_ptr + i.to(tl.int64) * CHUNK_ELEMS).to(tl.int64)
    size = tl.full([BLOCK], CHUNK_BYTES, tl.int32)
    tl.inline_asm_elementwise(
        "cp.async.bulk.prefetch.L2.global [$1], $2;\n\tmov.u32 $0, 0;",
        "=r,l,r",
        [addr, size],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )


def prefetch_chunks(t: torch.Tensor, max_bytes: int) -> int:
    """How many whole CHUNK_BYTES chunks of t's first `max_bytes` a prefetch covers."""
    return min(t.numel() * t.element_size(), max_bytes) // CHUNK_BYTES


def l2_prefetch(t: torch.Tensor, max_bytes: int) -> None:
    """Start pulling the first `max_bytes` of the contiguous CUDA tensor t (whole chunks of
    CHUNK_BYTES) into L2, on the current stream; returns once issued."""
    assert t.is_cuda and t.is_contiguous() and t.data_ptr() % 16 == 0
    chunks = prefetch_chunks(t, max_bytes)
    if chunks == 0:
        return
    _l2_prefetch_kernel[(triton.cdiv(chunks, BLOCK),)](
        t, chunks, CHUNK_ELEMS=CHUNK_BYTES // t.element_size(), CHUNK_BYTES=CHUNK_BYTES,
        BLOCK=BLOCK, num_warps=BLOCK // 32,
    )  # fmt: skip

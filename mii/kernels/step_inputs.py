"""A decode step's inputs into a CUDA graph's buffers in one launch.

The engine copies a step's plan to the device as one packed int64 vector
(`StepPlan.pack`). A step that replays a captured graph then has to put those arrays where
the graph reads them: the token ids (the PENDING ones from the samples of the step still
running), positions, cache slots, sequence lengths and block tables (int32), and the padding
rows' slot -1 and length 1. As torch operations that was some ten launches between two
replays (copies, int32 conversions, the pending tokens' gather and scatter), each a few
microseconds of a batch-1 token. Here it is one kernel, launched without PDL before the
replay (the graph's kernels read these buffers as step inputs: kernels/pdl.py).

One program per row of the graph's padded batch. Rows holding a PENDING token (-1 in the
packed ids) are left to the programs of the pending list, which write `tokens[source]`
there, so no two programs write one element.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_W = 128  # block-table entries a program copies per round


@triton.jit(do_not_specialize=["batch", "width", "pending", "off_ids", "off_pos", "off_slots",
                               "off_tables", "off_lens", "off_prows", "off_psrc"])  # fmt: skip
def _step_inputs_kernel(
    packed_ptr, tokens_ptr, ids_ptr, pos_ptr, slots_ptr, tables_ptr, lens_ptr,
    batch, width, pending, off_ids, off_pos, off_slots, off_tables, off_lens, off_prows,
    off_psrc, stride_table, BLOCK_W: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0)
    if row < batch:
        token = tl.load(packed_ptr + off_ids + row)
        if token >= 0:  # a PENDING token (-1) comes from the pending list below
            tl.store(ids_ptr + row, token)
        tl.store(pos_ptr + row, tl.load(packed_ptr + off_pos + row))
        tl.store(slots_ptr + row, tl.load(packed_ptr + off_slots + row))
        tl.store(lens_ptr + row, tl.load(packed_ptr + off_lens + row).to(tl.int32))
        src = packed_ptr + off_tables + row.to(tl.int64) * width
        dst = tables_ptr + row.to(tl.int64) * stride_table
        for start in range(0, width, BLOCK_W):
            cols = start + tl.arange(0, BLOCK_W)
            entries = tl.load(src + cols, mask=cols < width, other=0)
            tl.store(dst + cols, entries.to(tl.int32), mask=cols < width)
    else:  # a padding row: writes no cache slot, attends to one key
        tl.store(slots_ptr + row, -1)
        tl.store(lens_ptr + row, 1)
    if row < pending:
        target = tl.load(packed_ptr + off_prows + row)
        source = tl.load(packed_ptr + off_psrc + row)
        tl.store(ids_ptr + target, tl.load(tokens_ptr + source))


def write_step_inputs(
    packed: torch.Tensor,
    offsets: dict[str, int],
    batch: int,
    width: int,
    pending: int,
    tokens: torch.Tensor | None,
    buffers: dict[str, torch.Tensor],
    size: int,
) -> None:
    """Unpack a packed plan (`StepPlan.pack`, on the device) into a graph's buffers for its
    first `size` rows: `offsets` of the arrays "input_ids", "positions", "slot_mapping",
    "block_tables", "seq_lens", "pending_rows", "pending_sources" in `packed`; `tokens`:
    the samples the pending rows take theirs from (None when `pending` is 0); `buffers`:
    the graph's "input_ids", "positions", "slot_mapping" (int64), "block_tables" (int32,
    at least `width` columns) and "seq_lens" (int32)."""
    assert packed.dtype == torch.int64 and packed.is_contiguous()
    assert 1 <= batch <= size and pending <= batch
    tables = buffers["block_tables"]
    assert tables.dtype == torch.int32 and tables.shape[1] >= width and tables.stride(1) == 1
    assert buffers["seq_lens"].dtype == torch.int32
    if pending:
        assert tokens is not None and tokens.dtype == torch.int64
    _step_inputs_kernel[(size,)](
        packed, packed if tokens is None else tokens, buffers["input_ids"],
        buffers["positions"], buffers["slot_mapping"], tables, buffers["seq_lens"],
        batch, width, pending, offsets["input_ids"], offsets["positions"],
        offsets["slot_mapping"], offsets["block_tables"], offsets["seq_lens"],
        offsets["pending_rows"], offsets["pending_sources"], tables.stride(0),
        BLOCK_W=BLOCK_W, num_warps=1,
    )  # fmt: skip

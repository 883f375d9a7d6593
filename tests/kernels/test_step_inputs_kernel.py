"""kernels/step_inputs.py: a packed decode plan into a CUDA graph's buffers in one launch,
against what `DecodeGraphs.run`'s torch copies leave there (ids with the PENDING ones taken
from the step before's samples, positions, slots, int32 lengths and block tables, padding
rows at slot -1 and length 1, and nothing past the plan's table width touched)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mii.engine.step_plan import StepPlan

MAX_BATCH, MAX_BLOCKS = 8, 300


def _plan(batch: int, width: int, pending: list[tuple[int, int]], seed: int) -> StepPlan:
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 32000, batch).astype(np.int64)
    for row, _ in pending:
        ids[row] = -1  # PENDING
    lens = rng.integers(1, width * 16 + 1, batch).astype(np.int32)
    positions = lens.astype(np.int64) - 1
    tables = rng.integers(0, 5000, (batch, width)).astype(np.int32)
    rows_sources = np.array(pending, dtype=np.int64).reshape(-1, 2)
    return StepPlan(
        input_ids=ids,
        positions=positions,
        slot_mapping=tables[:, 0].astype(np.int64) * 16 + positions % 16,
        block_tables=tables,
        query_start_loc=np.arange(batch + 1, dtype=np.int32),
        seq_lens=lens,
        logits_indices=np.arange(batch, dtype=np.int64),
        pending_rows=rows_sources[:, 0].copy(),
        pending_sources=rows_sources[:, 1].copy(),
    )


def _buffers(device) -> dict[str, torch.Tensor]:
    """A graph's buffers holding stale values from an earlier, larger step."""
    return {
        "input_ids": torch.full((MAX_BATCH,), 7, dtype=torch.int64, device=device),
        "positions": torch.full((MAX_BATCH,), 7, dtype=torch.int64, device=device),
        "slot_mapping": torch.full((MAX_BATCH,), 7, dtype=torch.int64, device=device),
        "block_tables": torch.full((MAX_BATCH, MAX_BLOCKS), 7, dtype=torch.int32, device=device),
        "seq_lens": torch.full((MAX_BATCH,), 7, dtype=torch.int32, device=device),
    }


def _check(mod, device, batch, width, size, pending, seed=0):
    plan = _plan(batch, width, pending, seed)
    samples = torch.arange(100, 100 + batch, dtype=torch.int64, device=device) * 3
    packed = torch.from_numpy(plan.pack()).to(device)
    bufs = _buffers(device)
    tokens = samples if pending else None
    mod.write_step_inputs(packed, plan.offsets(), batch, width, len(pending), tokens, bufs, size)
    bufs = {k: v.cpu() for k, v in bufs.items()}
    ids = torch.from_numpy(plan.input_ids.copy())
    for row, source in pending:
        ids[row] = samples[source].item()
    assert torch.equal(bufs["input_ids"][:batch], ids)
    assert torch.equal(bufs["positions"][:batch], torch.from_numpy(plan.positions))
    assert torch.equal(bufs["slot_mapping"][:batch], torch.from_numpy(plan.slot_mapping))
    assert torch.equal(bufs["seq_lens"][:batch], torch.from_numpy(plan.seq_lens))
    assert torch.equal(bufs["block_tables"][:batch, :width], torch.from_numpy(plan.block_tables))
    assert (bufs["block_tables"][:, width:] == 7).all(), "past the plan's width: untouched"
    assert (bufs["slot_mapping"][batch:size] == -1).all(), "padding rows write no slot"
    assert (bufs["seq_lens"][batch:size] == 1).all()
    assert (bufs["seq_lens"][size:] == 7).all(), "rows past the graph's size: untouched"


CASES = [  # batch, table width, graph size, (row, source) of the PENDING tokens
    (1, 1, 1, [(0, 0)]),
    (3, 5, 4, [(0, 2), (2, 0)]),
    (5, 300, 8, []),
    (8, 129, 8, [(i, 7 - i) for i in range(8)]),
]


@pytest.mark.parametrize(("batch", "width", "size", "pending"), CASES)
def test_unpacks_a_plan_interpreted(interpreted, batch, width, size, pending):
    _check(interpreted.step_inputs, "cpu", batch, width, size, pending)


@pytest.mark.gpu
@pytest.mark.parametrize(("batch", "width", "size", "pending"), CASES)
def test_unpacks_a_plan_gpu(compiled, batch, width, size, pending):
    _check(compiled.step_inputs, "cuda", batch, width, size, pending)

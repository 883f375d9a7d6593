"""CUDA graphs of decode-only steps.

A decode step of a 7B model launches hundreds of small kernels; replaying them as one
captured graph removes the launch gaps that otherwise dominate batch-1 latency. One graph
is captured per padded batch size; a step pads its batch up to the nearest size (padding
rows write nothing to the cache and their logits are dropped).
"""

from __future__ import annotations

import bisect

import torch
from torch import nn

from mii.engine.layers.attention import AttentionMetadata
from mii.engine.step_plan import StepPlan


def graph_batch_sizes(max_batch: int) -> list[int]:
    sizes = [b for b in (1, 2, 4, 8) if b < max_batch]
    sizes += list(range(16, max_batch, 16))
    return sorted({*sizes, max_batch})


class DecodeGraphs:
    def __init__(self, model: nn.Module, device: torch.device, max_batch: int, max_blocks: int):
        self.model = model
        self.sizes = graph_batch_sizes(max_batch)
        self.max_blocks = max_blocks
        i32, i64 = torch.int32, torch.int64
        self.input_ids = torch.zeros(max_batch, dtype=i64, device=device)
        self.positions = torch.zeros(max_batch, dtype=i64, device=device)
        self.slot_mapping = torch.full((max_batch,), -1, dtype=i64, device=device)
        self.block_tables = torch.zeros((max_batch, max_blocks), dtype=i32, device=device)
        self.query_start_loc = torch.arange(max_batch + 1, dtype=i32, device=device)
        self.seq_lens = torch.ones(max_batch, dtype=i32, device=device)
        # the buffers a step writes (`run_packed`), by the names kernels/step_inputs.py takes
        self.inputs = {
            "input_ids": self.input_ids, "positions": self.positions,
            "slot_mapping": self.slot_mapping, "block_tables": self.block_tables,
            "seq_lens": self.seq_lens,
        }  # fmt: skip
        # Our own capture stream: torch's default one is made once per process, on the device
        # that was current then, and capturing on it switches to that device.
        self.stream = torch.cuda.Stream(device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}

    def _meta(self, batch: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slot_mapping[:batch],
            block_tables=self.block_tables[:batch],
            query_start_loc=self.query_start_loc[: batch + 1],
            seq_lens=self.seq_lens[:batch],
            max_query_len=1,
            max_seq_len=self.max_blocks,
        )

    def _forward(self, batch: int) -> torch.Tensor:
        hidden = self.model(self.input_ids[:batch], self.positions[:batch], self._meta(batch))
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture largest first, so the smaller graphs reuse the same memory pool."""
        pool = None
        for batch in reversed(self.sizes):
            self._forward(batch)  # warm-up: kernel compilation and autotuning happen here
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=self.stream):
                self.logits[batch] = self._forward(batch)
            pool = graph.pool()
            self.graphs[batch] = graph
        torch.cuda.synchronize()

    def release(self) -> None:
        """Free the graphs. A graph holding NCCL collectives must be released before its
        process group is destroyed: NCCL's communicator teardown waits for it forever."""
        for graph in self.graphs.values():
            graph.reset()
        self.graphs.clear()
        self.logits.clear()

    def fits(self, plan: StepPlan) -> bool:
        """Whether a step replays a graph: decode-only, within the largest graph's batch
        and block-table width."""
        batch, width = plan.block_tables.shape
        return plan.max_query_len == 1 and batch <= self.sizes[-1] and width <= self.max_blocks

    def _padded(self, batch: int) -> int:
        """The batch of the graph a step of `batch` sequences replays."""
        return self.sizes[bisect.bisect_left(self.sizes, batch)]

    def run_packed(
        self, plan: StepPlan, packed: torch.Tensor, tokens: torch.Tensor | None
    ) -> torch.Tensor:
        """`run` for a plan packed on the device (`StepPlan.pack`): its arrays go into the
        graph's buffers in one launch (kernels/step_inputs.py), the PENDING tokens from
        `tokens` (the samples of the step before)."""
        from mii.kernels.step_inputs import write_step_inputs  # triton: imported when used

        batch, width = plan.block_tables.shape
        size = self._padded(batch)
        pending = len(plan.pending_rows)
        write_step_inputs(packed, plan.offsets(), batch, width, pending, tokens, self.inputs, size)
        self.graphs[size].replay()
        return self.logits[size][:batch]

    def run(self, input_ids, positions, meta: AttentionMetadata) -> torch.Tensor:
        """Logits (batch, vocab) of a decode-only step, by replaying the nearest graph."""
        batch = input_ids.shape[0]
        size = self._padded(batch)
        self.input_ids[:batch].copy_(input_ids)
        self.positions[:batch].copy_(positions)
        self.slot_mapping[:batch].copy_(meta.slot_mapping)
        self.slot_mapping[batch:size].fill_(-1)
        self.seq_lens[:batch].copy_(meta.seq_lens)
        self.seq_lens[batch:size].fill_(1)
        width = meta.block_tables.shape[1]
        self.block_tables[:batch, :width].copy_(meta.block_tables)
        self.graphs[size].replay()
        return self.logits[size][:batch]

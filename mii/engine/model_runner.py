"""Runs one scheduled step: flattens its chunks into one ragged batch, runs the model over
the paged KV cache, samples the sequences that reached their last token."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from mii.engine import kv_cache
from mii.engine.config import EngineConfig
from mii.engine.cuda_graphs import DecodeGraphs
from mii.engine.layers.attention import AttentionMetadata, PagedAttention
from mii.engine.loader import (
    build_model,
    init_random_weights,
    load_weights,
    materialize,
)
from mii.engine.quantization import checkpoint_quantization, plan_quantization
from mii.engine.sampler import Sampler, SamplerOutput
from mii.engine.scheduler import ScheduledChunk
from mii.engine.step_plan import HEADER, PACKED_ARRAYS, StepPlan
from mii.engine.tp.context import SINGLE, ParallelContext
from mii.kernels.dispatch import split_prompts

GIB = 1 << 30
MAX_GRAPH_BATCH = 512
"""Decode batches up to this many sequences (and max_num_seqs) replay CUDA graphs; larger
ones run eagerly."""


def _step_inputs_kernel() -> bool:
    """Whether a graph step's inputs go into the graph's buffers in one launch
    (kernels/step_inputs.py); `MII_STEP_INPUTS_KERNEL=0`: as torch copies (`DecodeGraphs.run`)."""
    return os.environ.get("MII_STEP_INPUTS_KERNEL", "1") != "0"


@dataclass
class StepInputs:
    input_ids: torch.Tensor  # (T,) int64
    positions: torch.Tensor  # (T,) int64
    meta: AttentionMetadata
    logits_indices: torch.Tensor  # (N,) rows of the sequences that sample
    pending_rows: torch.Tensor  # (P,) rows of input_ids whose token the last step sampled
    pending_sources: torch.Tensor  # (P,) which of the last step's samples each one is


class ModelRunner:
    def __init__(
        self,
        config: EngineConfig,
        hf_config: Any,
        model_path: str,
        dtype: torch.dtype,
        max_positions: int,
        tp: ParallelContext = SINGLE,
        random_weights: bool = False,
    ) -> None:
        self.config = config
        self.device = config.torch_device
        self.dtype = dtype
        self.block_size = config.cache.block_size
        self.max_positions = max_positions
        self.tp = tp = tp.with_peer_all_reduce(self.device, dtype)
        quantizing = config.quantization == "fp8" or checkpoint_quantization(hf_config)
        self.model = build_model(
            hf_config, dtype, self.device, tp, max_positions, weights_on_meta=bool(quantizing)
        )
        quant = plan_quantization(
            config.quantization, hf_config, self.model, None if random_weights else model_path
        )
        if quant is not None:
            quant.prepare(self.model, self.device)
        materialize(self.model, self.device)
        if random_weights:
            init_random_weights(self.model)
        else:
            load_weights(self.model, model_path, quant and quant.weights(model_path))
        if quant is not None:
            quant.finish(self.model)
        self._pack_cpu_weights()
        self.attention_layers = [m for m in self.model.modules() if isinstance(m, PagedAttention)]
        # Every rank of a tensor-parallel group must hold the same number of blocks.
        self.kv_dtype = kv_cache.cache_dtype(config.cache.kv_cache_dtype, dtype)
        self.num_blocks = tp.min_over_ranks(config.cache.num_blocks or self._blocks_that_fit())
        self.kv_scales: torch.Tensor | None = None  # (2, layers, Hkv) of an fp8 cache
        if self.kv_dtype == kv_cache.FP8_DTYPE:
            self.kv_scales = self._fp8_kv_scales(hf_config, quant, max_positions)
        self._allocate_cache()
        self.sampler: Sampler | None = None
        self.graphs: DecodeGraphs | None = None
        self._pinned: torch.Tensor | None = None
        self._copied: torch.cuda.Event | None = None
        if self.device.type == "cuda" and not config.enforce_eager:
            max_blocks = -(-max_positions // self.block_size)
            batch = min(config.scheduler.max_num_seqs, MAX_GRAPH_BATCH)
            self.graphs = DecodeGraphs(self.model, self.device, batch, max_blocks)
            self.graphs.capture()

    def _fp8_kv_scales(self, hf_config, quant, max_positions: int) -> torch.Tensor:
        """An fp8 cache's scales: an FP8 checkpoint's where it has them (`quant` read them
        with its other scales), else calibrated."""
        layers = self.attention_layers
        if quant is not None and quant.kv_scales:
            stored = kv_cache.scales_from_checkpoint(
                quant.kv_scales.items(), len(layers), layers[0].num_kv_heads
            )
            if stored is not None:
                return stored.to(self.device)
        tokens = min(self.config.scheduler.max_num_batched_tokens, max_positions)
        return kv_cache.calibrate_scales(
            self.model, layers, hf_config.vocab_size, tokens, self.block_size, self.dtype
        )

    def _pack_cpu_weights(self) -> None:
        if self.device.type != "cpu":
            return
        hint = min(64, self.config.scheduler.max_num_seqs)  # decode batches dominate
        for module in self.model.modules():
            if hasattr(module, "pack_for_cpu"):
                module.pack_for_cpu(hint)

    # ---- memory planning -------------------------------------------------------------
    @property
    def bytes_per_block(self) -> int:
        layer = self.attention_layers[0]
        per_token = 2 * layer.num_kv_heads * layer.head_dim * self.kv_dtype.itemsize
        return per_token * self.block_size * len(self.attention_layers)

    def _blocks_that_fit(self) -> int:
        # Past what max_num_seqs requests of the longest context can hold, more blocks only
        # cost host memory in the block manager (tiny models on a big GPU: millions).
        per_seq = -(-self.max_positions // self.block_size)
        useful = 2 * self.config.scheduler.max_num_seqs * per_seq
        if self.device.type != "cuda":
            fit = int(self.config.cache.cpu_kv_cache_gib * GIB) // self.bytes_per_block
            return max(1, min(fit, useful))
        torch.cuda.empty_cache()  # memory cached but unused is free for our purpose
        free, total = torch.cuda.mem_get_info(self.device)
        peak = self._profile_activation_peak()
        budget = total * self.config.cache.gpu_memory_utilization - (total - free) - peak
        if budget < self.bytes_per_block:
            raise RuntimeError(
                f"no GPU memory left for the KV cache (free {free / GIB:.1f} GiB, activation "
                f"peak {peak / GIB:.1f} GiB); raise gpu_memory_utilization or max_length lower"
            )
        return min(int(budget // self.bytes_per_block), useful)

    def _profile_activation_peak(self) -> int:
        """Peak memory of a full-budget forward pass: one sequence of `budget` tokens over a
        scratch cache just large enough for it (shared by all layers)."""
        tokens = self.config.scheduler.max_num_batched_tokens
        layer, dev = self.attention_layers[0], self.device
        blocks = -(-tokens // self.block_size)
        scratch = torch.zeros(
            (blocks, self.block_size, layer.num_kv_heads, layer.head_dim),
            dtype=self.dtype, device=dev,
        )  # fmt: skip
        for attn in self.attention_layers:
            attn.bind_cache(scratch, scratch)
        torch.cuda.reset_peak_memory_stats(dev)
        before = torch.cuda.memory_allocated(dev)
        meta = AttentionMetadata.one_sequence(tokens, self.block_size, dev)
        with torch.inference_mode():
            ids = torch.zeros(tokens, dtype=torch.int64, device=dev)
            # positions wrap inside the rotary table: a budget may exceed max_length
            positions = torch.arange(tokens, device=dev) % self.max_positions
            hidden = self.model(ids, positions, meta)
            self.model.compute_logits(hidden[-self.config.scheduler.max_num_seqs :])
        torch.cuda.synchronize(dev)
        peak = torch.cuda.max_memory_allocated(dev) - before
        del scratch
        torch.cuda.empty_cache()
        return peak

    def _allocate_cache(self) -> None:
        layer = self.attention_layers[0]
        shape = (
            2,
            len(self.attention_layers),
            self.num_blocks,
            self.block_size,
            layer.num_kv_heads,
            layer.head_dim,
        )
        # Zeros, not garbage: attention multiplies masked-out slots by a zero weight, and
        # a NaN bit pattern left in never-written memory would survive that product.
        self.kv_cache = torch.zeros(shape, dtype=self.kv_dtype, device=self.device)
        for i, attn in enumerate(self.attention_layers):
            scales = () if self.kv_scales is None else self.kv_scales[:, i]  # (2, Hkv)
            attn.bind_cache(self.kv_cache[0, i], self.kv_cache[1, i], *scales)

    # ---- one step ----------------------------------------------------------------------
    def prepare(self, plan: StepPlan) -> StepInputs:
        """The plan's arrays as tensors on the device: on CUDA one pinned host-to-device
        copy of the packed plan (one pageable copy per array would each wait for the
        stream), then views of it."""
        if self.device.type != "cuda":
            return _inputs(plan, {k: torch.from_numpy(getattr(plan, k)) for k in PACKED_ARRAYS})
        return _inputs(plan, _device_views(plan, self._packed_on_device(plan)))

    def _packed_on_device(self, plan: StepPlan) -> torch.Tensor:
        """The packed plan (`StepPlan.pack`) on the device: one pinned host-to-device copy."""
        packed = plan.pack()
        if self._copied is not None:
            self._copied.synchronize()  # the last copy out of the pinned buffer is done
        if self._pinned is None or self._pinned.numel() < packed.size:
            self._pinned = torch.empty(2 * packed.size, dtype=torch.int64, pin_memory=True)
        host = self._pinned[: packed.size]
        host.numpy()[:] = packed
        device = host.to(self.device, non_blocking=True)
        self._copied = torch.cuda.Event()
        self._copied.record()
        return device

    @torch.inference_mode()
    def run(
        self,
        chunks: list[ScheduledChunk],
        previous: SamplerOutput | None = None,
        sample_rows: dict[int, int] | None = None,
    ) -> SamplerOutput | None:
        """One forward pass; returns the samples of the chunks that end their sequence (on
        the device: nothing here waits for the GPU). With asynchronous scheduling, PENDING
        input tokens are `previous`'s samples at `sample_rows[id(seq)]`."""
        long_rope = getattr(self.model, "long_prompt_rope", None)
        plan = StepPlan.build(chunks, self.block_size, sample_rows, long_rope=long_rope)
        source = previous.token_ids if previous is not None else None
        logits = self.execute(plan, source)
        if logits is None:
            return None
        return self.sampler(logits, [c.seq for c in chunks if c.samples])

    @torch.inference_mode()
    def execute(self, plan: StepPlan, source: torch.Tensor | None = None) -> torch.Tensor | None:
        """The forward pass (what every tensor-parallel rank runs): logits of the rows that
        sample, None when none does. `source`: the samples of the step before, for the
        PENDING tokens of the plan (rank 0 shares them with the other ranks)."""
        tokens = None
        if len(plan.pending_rows):
            tokens = self._pending_tokens(source, int(plan.pending_sources.max()) + 1)
        graphs = self.graphs if self.graphs is not None and self.graphs.fits(plan) else None
        if graphs is not None and _step_inputs_kernel():
            return graphs.run_packed(plan, self._packed_on_device(plan), tokens)
        inputs = self.prepare(plan)
        if tokens is not None:
            inputs.input_ids[inputs.pending_rows] = tokens[inputs.pending_sources]
        if graphs is not None:
            return graphs.run(inputs.input_ids, inputs.positions, inputs.meta)
        hidden = self.model(inputs.input_ids, inputs.positions, inputs.meta)
        if len(plan.logits_indices) == 0:
            return None
        return self.model.compute_logits(hidden[inputs.logits_indices])

    def _pending_tokens(self, source: torch.Tensor | None, count: int) -> torch.Tensor:
        """The last step's samples: rank 0 has them, the other ranks receive them (one small
        broadcast on the model's group, queued on the stream like the rest of the step)."""
        tp = self.tp
        if tp.world_size == 1:
            return source
        if tp.rank == 0:
            tokens = source[:count].contiguous()
        else:
            tokens = torch.empty(count, dtype=torch.int64, device=self.device)
        return tp.broadcast(tokens)

    def check_step(self) -> None:
        """Raise if the step just read back cannot be trusted (a tensor-parallel rank died
        while it ran); nothing to check in one process."""

    def close(self) -> None:
        """Release what outlives the runner's memory: its CUDA graphs (see tp/leader.py for
        the process group of a tensor-parallel runner)."""
        if self.graphs is not None:
            self.graphs.release()
            self.graphs = None


def _device_views(plan: StepPlan, packed: torch.Tensor) -> dict[str, torch.Tensor]:
    """Split the packed plan on the device (layout of `StepPlan.pack`)."""
    seqs, width = plan.block_tables.shape
    sizes = [HEADER, *StepPlan.part_sizes(plan.header())]
    _, ids, pos, slots, tables, starts, lens, rows, p_rows, p_sources = torch.split(packed, sizes)
    return {
        "input_ids": ids, "positions": pos, "slot_mapping": slots,
        "block_tables": tables.view(seqs, width).to(torch.int32),
        "query_start_loc": starts.to(torch.int32), "seq_lens": lens.to(torch.int32),
        "logits_indices": rows, "pending_rows": p_rows, "pending_sources": p_sources,
    }  # fmt: skip


def _inputs(plan: StepPlan, t: dict[str, torch.Tensor]) -> StepInputs:
    decodes = plan.num_decodes
    split = (0 < decodes < len(plan.seq_lens) and t["query_start_loc"].is_cuda
             and os.environ.get("MII_MIXED_DECODES_APART", "1") != "0")  # fmt: skip
    meta = AttentionMetadata(
        slot_mapping=t["slot_mapping"],
        block_tables=t["block_tables"],
        query_start_loc=t["query_start_loc"],
        seq_lens=t["seq_lens"],
        max_query_len=plan.max_query_len,
        max_seq_len=plan.max_seq_len,
        num_decodes=decodes,
        prompts=split_prompts(t["block_tables"], t["query_start_loc"], t["seq_lens"], decodes)
        if split
        else None,
    )
    return StepInputs(
        t["input_ids"], t["positions"], meta, t["logits_indices"],
        t["pending_rows"], t["pending_sources"],
    )  # fmt: skip

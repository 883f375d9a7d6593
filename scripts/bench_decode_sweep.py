"""Decode attention tile sweep at the shapes the engine meets (bf16 or, with --fp8, an e4m3
cache with per-head scales; GPU).

The offline workload decodes 256 sequences of ~600 tokens per step, where loops are short
and the pipeline prologue weighs; the kernel benchmark's 64 x 4096 shape hides that.
Prints the fraction of copy bandwidth of each (splits, block_n, warps, stages).
"""

from __future__ import annotations

import argparse
import itertools

import torch
from bench_kernels import BLOCK_SIZE, DTYPE, bench_ms, copy_bandwidth, paged_from_dense, rel_err

from mii.kernels import decode_attention as decode_mod
from mii.kernels import torch_ref

MODEL_CONTEXT = 32768  # Mistral-7B's max_position_embeddings


def sweep(copy_bw, batch, context, fp8=False, q_heads=32, kv_heads=8, dim=128, narrow=None):
    held = -(-context // BLOCK_SIZE) * BLOCK_SIZE  # whole cache blocks; `context` attended
    k, v = (torch.randn(batch, held, kv_heads, dim, device="cuda", dtype=DTYPE) for _ in "kv")
    k_cache, v_cache, tables = paged_from_dense(k, v)
    del k, v
    scales = {}
    if fp8:
        amax = [c.float().abs().amax(dim=(0, 1, 3)) / torch_ref.FP8_MAX for c in (k_cache, v_cache)]
        scales = {"k_scale": amax[0], "v_scale": amax[1]}
        k_cache, v_cache = (
            torch_ref.quantize_fp8(c, s) for c, s in zip((k_cache, v_cache), amax, strict=True)
        )
    q = torch.randn(batch, q_heads, dim, device="cuda", dtype=DTYPE)
    lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    starts = torch.arange(batch + 1, dtype=torch.int32, device="cuda")
    scale = dim**-0.5
    expected = torch_ref.paged_attention_ref(
        q, k_cache, v_cache, tables, starts, lens, scale, **scales
    )
    moved = 2 * batch * context * kv_heads * dim * k_cache.element_size()
    rows = []
    # fp8: fewer warps issue fewer instructions a tile (sm_90 SASS of a 64-key tile: 1,812
    # a thread with one warp, 665 with four; 58K against 85K thread-instructions)
    tiles, warps_ = ((64, 128, 256), (1, 2, 4, 8)) if fp8 else ((32, 64, 128), (2, 4, 8))
    stages_ = (2, 3, 4)
    if narrow:  # --block-n / --warps / --stages: a shorter sweep
        full = (tiles, warps_, stages_)
        tiles, warps_, stages_ = (n or d for n, d in zip(narrow, full, strict=True))
    # The engine's launch: its graphs' block tables span the model's whole context.
    sm_count = torch.cuda.get_device_properties(0).multi_processor_count
    engine_splits = decode_mod.default_num_splits(batch, kv_heads, MODEL_CONTEXT, sm_count)
    split_counts = sorted({1, 2, engine_splits})
    for splits, bn, warps, stages in itertools.product(split_counts, tiles, warps_, stages_):
        config = decode_mod.SplitConfig(bn, warps, stages)

        def run(s=splits, c=config):
            return decode_mod.launch(q, k_cache, v_cache, tables, lens, scale, s, c, None, **scales)

        try:
            err = rel_err(run(), expected)
            ms = bench_ms(run)
        except Exception as e:  # noqa: BLE001 (a config that does not compile is skipped)
            print(f"skip {splits} {config}: {type(e).__name__}")
            continue
        rows.append((moved / (ms * 1e-3) / copy_bw, ms * 1e3, splits, config, err))
    rows.sort(key=lambda r: -r[0])
    print(f"batch {batch} context {context} {'fp8' if fp8 else 'bf16'}: best of {len(rows)}")
    for frac, us, splits, config, err in rows[:6]:
        print(f"  {frac:.2f} of copy  {us:7.1f} us  splits {splits} {tuple(config)} err {err:.0e}")
    picked = decode_mod.SplitConfig.for_cache(dim, k_cache.dtype)
    default = [r for r in rows if r[2] == engine_splits and tuple(r[3]) == tuple(picked)]
    if default:
        frac, us = default[0][:2]
        picked_s = f"splits {engine_splits} {tuple(picked)}"
        print(f"  engine's: {frac:.2f} of copy {us:.1f} us ({picked_s})")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--fp8", action="store_true", help="an e4m3 cache (per-head scales)")
    ap.add_argument("--shapes", nargs="*", default=["256x576", "128x1100", "64x4096", "1x300"])
    ap.add_argument("--block-n", type=int, nargs="*", help="only these key tiles")
    ap.add_argument("--warps", type=int, nargs="*", help="only these warp counts")
    ap.add_argument("--stages", type=int, nargs="*", help="only these stage counts")
    args = ap.parse_args()
    narrow = (args.block_n, args.warps, args.stages)
    copy_bw = copy_bandwidth()
    for shape in args.shapes:
        batch, context = (int(x) for x in shape.split("x"))
        sweep(copy_bw, batch, context, args.fp8, narrow=narrow)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

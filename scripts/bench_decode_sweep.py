"""Decode attention tile sweep at the shapes the engine meets (bf16, GPU).

The offline workload decodes 256 sequences of ~600 tokens per step, where loops are short
and the pipeline prologue weighs; the kernel benchmark's 64 x 4096 shape hides that.
Prints the fraction of copy bandwidth of each (splits, block_n, warps, stages).
"""

from __future__ import annotations

import itertools

import torch
from bench_kernels import DTYPE, bench_ms, copy_bandwidth, paged_from_dense, rel_err

from mii.kernels import decode_attention as decode_mod
from mii.kernels import torch_ref


def sweep(copy_bw, batch, context, q_heads=32, kv_heads=8, dim=128):
    k, v = (torch.randn(batch, context, kv_heads, dim, device="cuda", dtype=DTYPE) for _ in "kv")
    k_cache, v_cache, tables = paged_from_dense(k, v)
    q = torch.randn(batch, q_heads, dim, device="cuda", dtype=DTYPE)
    lens = torch.full((batch,), context, dtype=torch.int32, device="cuda")
    starts = torch.arange(batch + 1, dtype=torch.int32, device="cuda")
    expected = torch_ref.paged_attention_ref(q, k_cache, v_cache, tables, starts, lens, dim**-0.5)
    moved = 2 * batch * context * kv_heads * dim * 2
    rows = []
    for splits, bn, warps, stages in itertools.product((1, 2), (32, 64, 128), (2, 4, 8), (2, 3, 4)):
        config = decode_mod.SplitConfig(bn, warps, stages)

        def run(s=splits, c=config):
            return decode_mod.launch(q, k_cache, v_cache, tables, lens, dim**-0.5, s, c)

        try:
            err = rel_err(run(), expected)
            ms = bench_ms(run)
        except Exception as e:  # noqa: BLE001 (a config that does not compile is skipped)
            print(f"skip {splits} {config}: {type(e).__name__}")
            continue
        rows.append((moved / (ms * 1e-3) / copy_bw, ms * 1e3, splits, config, err))
    rows.sort(key=lambda r: -r[0])
    print(f"batch {batch} context {context}: best of {len(rows)}")
    for frac, us, splits, config, err in rows[:6]:
        print(f"  {frac:.2f} of copy  {us:7.1f} us  splits {splits} {tuple(config)} err {err:.0e}")
    default = [r for r in rows if r[2] == 1 and tuple(r[3]) == tuple(decode_mod.SplitConfig())]
    if default:
        print(f"  default: {default[0][0]:.2f} of copy {default[0][1]:.1f} us")


def main() -> None:
    copy_bw = copy_bandwidth()
    for batch, context in ((256, 576), (128, 1100), (64, 4096), (1, 300)):
        sweep(copy_bw, batch, context)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()

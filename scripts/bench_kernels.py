"""GPU benchmark of the Triton kernels against their baselines, measured in one run.

- prefill: ragged paged attention vs torch SDPA (flash, causal), B8 H32 S2048 D128 bf16;
- decode: paged_attention and split-K decode_attention at batch 64, context 4096,
  32 q / 8 kv heads, D128, block size 16, as a fraction of the measured copy bandwidth;
- decode over an fp8 (e4m3) cache against the same over bf16, split-K at batch 1, 8, 64
  and the ragged kernel at 64 (half the bytes: the ratio says what that buys);
- rms_norm, silu_and_mul, rope_kv_write vs their torch references.

Every kernel is checked against its baseline before it is timed. Tile shapes are swept
(the launchers' defaults are marked); prints a table last and writes $OUT/kernels.json.
Usage: python scripts/bench_kernels.py

`--prefill B S KV_HEADS` times the prefill attention alone at B prompts of S tokens, 32 query
heads over KV_HEADS (grouped, as the engine packs them; SDPA over the repeated kv heads), over the
wider PREFILL_SWEEP: `--prefill 8 512 8` is an offline step of the Mistral-7B shape (eight
512-token prompts in a 4,096-token budget).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.testing
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_common import copy_bandwidth  # noqa: E402

from mii.kernels import decode_attention as decode_mod  # noqa: E402
from mii.kernels import paged_attention as paged_mod  # noqa: E402
from mii.kernels import torch_ref  # noqa: E402
from mii.kernels.activation import silu_and_mul  # noqa: E402
from mii.kernels.rms_norm import rms_norm  # noqa: E402
from mii.kernels.rope_kv_write import rope_kv_write  # noqa: E402

DTYPE = torch.bfloat16
DEVICE = "cuda"
BLOCK_SIZE = 16
MAX_REL_ERR = 2e-2  # bf16 outputs against a bf16 (SDPA) or fp32 (reference) baseline
PREFILL_CONFIGS = [
    paged_mod.TileConfig(128, 64, 4, 3),
    paged_mod.TileConfig(128, 64, 4, 4),
    paged_mod.TileConfig(128, 128, 8, 2),
    paged_mod.TileConfig(128, 64, 8, 3),
]
PREFILL_SWEEP = PREFILL_CONFIGS + [
    paged_mod.TileConfig(m, n, w, st)
    for m, n, w, st in [(64, 64, 4, 3), (64, 128, 4, 3), (64, 32, 4, 3), (128, 32, 4, 3),
                        (128, 128, 8, 3), (256, 64, 8, 3), (256, 32, 8, 3), (128, 64, 4, 2)]
]  # fmt: skip
DECODE_CONFIGS = [
    paged_mod.TileConfig(16, 128, 4, 3),
    paged_mod.TileConfig(16, 128, 4, 2),
    paged_mod.TileConfig(16, 64, 4, 3),
    paged_mod.TileConfig(16, 32, 4, 4),
]
SPLIT_CONFIGS = [
    (1, decode_mod.SplitConfig(64, 4, 3)),
    (1, decode_mod.SplitConfig(128, 4, 3)),
    (2, decode_mod.SplitConfig(128, 4, 3)),
    (4, decode_mod.SplitConfig(128, 4, 3)),
]


def bench_ms(fn) -> float:
    return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def paged_from_dense(k: torch.Tensor, v: torch.Tensor):
    """Dense (B, S, Hkv, D) keys and values scattered into a paged cache in shuffled block
    order. Returns (k_cache, v_cache, block_tables)."""
    batch, seq, heads, dim = k.shape
    per_seq = seq // BLOCK_SIZE
    order = torch.randperm(batch * per_seq, device=DEVICE)
    tables = order.view(batch, per_seq).to(torch.int32)  # (B, blocks per seq)
    caches = []
    for dense in (k, v):
        cache = torch.empty((batch * per_seq, BLOCK_SIZE, heads, dim), dtype=DTYPE, device=DEVICE)
        cache[order] = dense.reshape(batch * per_seq, BLOCK_SIZE, heads, dim)
        caches.append(cache)
    return caches[0], caches[1], tables


def sweep(name, configs, run, check, default):
    """Time each config that compiles and passes the check; returns rows."""
    rows = []
    for config in configs:
        try:
            err = check(run(config))
            ms = bench_ms(lambda c=config: run(c))
        except (triton.runtime.errors.OutOfResources, RuntimeError) as e:
            print(f"{name} {config}: skipped ({type(e).__name__})", flush=True)
            continue
        ok = err < MAX_REL_ERR
        rows.append(
            {"config": config, "ms": ms, "rel_err": err, "ok": ok, "default": config == default}
        )
        print(
            f"{name} {config}: {ms:.3f} ms, rel err {err:.1e}{'' if ok else ' WRONG'}", flush=True
        )
    return rows


def bench_prefill(batch=8, heads=32, seq=2048, dim=128, kv_heads=None, configs=None) -> dict:
    kv_heads = kv_heads or heads
    q = torch.randn(batch, seq, heads, dim, device=DEVICE, dtype=DTYPE)
    k, v = (torch.randn(batch, seq, kv_heads, dim, device=DEVICE, dtype=DTYPE) for _ in "kv")
    k_cache, v_cache, tables = paged_from_dense(k, v)
    starts = torch.arange(0, batch * seq + 1, seq, dtype=torch.int32, device=DEVICE)
    lens = torch.full((batch,), seq, dtype=torch.int32, device=DEVICE)
    scale = dim**-0.5
    group = heads // kv_heads  # SDPA over the kv heads repeated for their query heads
    qt = q.transpose(1, 2)  # (B, H, S, D)
    kt, vt = (t.repeat_interleave(group, dim=2).transpose(1, 2) for t in (k, v))

    def sdpa(backend=SDPBackend.FLASH_ATTENTION):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(qt, kt, vt, is_causal=True, scale=scale)

    expected = sdpa().transpose(1, 2).reshape(batch * seq, heads, dim)
    flops = 4 * batch * heads * dim * seq * (seq + 1) / 2  # causal: half the score matrix
    others = {}  # SDPA's other backends, for context: the target compares with flash
    for name in ("CUDNN_ATTENTION", "EFFICIENT_ATTENTION"):
        backend = getattr(SDPBackend, name)
        try:
            ms = bench_ms(lambda b=backend: sdpa(b))
        except RuntimeError as e:
            print(f"SDPA {name}: unavailable ({e})"[:200], flush=True)
            continue
        others[name] = flops / (ms * 1e-3) / 1e12
    q_flat = q.view(batch * seq, heads, dim)  # (T, H, D)

    def run(config):
        return paged_mod.launch(q_flat, k_cache, v_cache, tables, starts, lens, scale, config)

    sdpa_ms = bench_ms(sdpa)
    default = paged_mod.tile_config(seq * (heads // kv_heads), dim)  # rows: tokens x group
    configs = configs or PREFILL_CONFIGS
    rows = sweep("prefill", configs, run, lambda o: rel_err(o, expected), default)
    for row in rows:
        row["tflops"] = flops / (row["ms"] * 1e-3) / 1e12
    sdpa_tflops = flops / (sdpa_ms * 1e-3) / 1e12
    return {"sdpa_ms": sdpa_ms, "sdpa_tflops": sdpa_tflops, "sdpa_others": others, "rows": rows}


def bench_decode(copy_bw, batch=64, context=4096, q_heads=32, kv_heads=8, dim=128) -> dict:
    k, v = (torch.randn(batch, context, kv_heads, dim, device=DEVICE, dtype=DTYPE) for _ in "kv")
    k_cache, v_cache, tables = paged_from_dense(k, v)
    del k, v
    q = torch.randn(batch, q_heads, dim, device=DEVICE, dtype=DTYPE)
    starts = torch.arange(batch + 1, dtype=torch.int32, device=DEVICE)
    lens = torch.full((batch,), context, dtype=torch.int32, device=DEVICE)
    scale = dim**-0.5
    expected = torch_ref.paged_attention_ref(q, k_cache, v_cache, tables, starts, lens, scale)
    moved = 2 * batch * context * kv_heads * dim * 2 + 2 * q.numel() * 2  # K, V; q, out

    def check(out):
        return rel_err(out, expected)

    def paged(config):
        return paged_mod.launch(q, k_cache, v_cache, tables, starts, lens, scale, config)

    def split(item):
        splits, config = item
        return decode_mod.launch(q, k_cache, v_cache, tables, lens, scale, splits, config)

    default_splits = decode_mod._num_splits(q, k_cache, tables)
    rows = sweep("decode paged", DECODE_CONFIGS, paged, check, paged_mod.tile_config(4, dim))
    rows += sweep(
        "decode split", SPLIT_CONFIGS, split, check, (default_splits, decode_mod.SplitConfig())
    )
    for row in rows:
        row["fraction_of_copy"] = moved / (row["ms"] * 1e-3) / copy_bw
    ref_ms = bench_ms(
        lambda: torch_ref.paged_attention_ref(q, k_cache, v_cache, tables, starts, lens, scale)
    )
    return {"bytes": moved, "torch_ref_ms": ref_ms, "rows": rows}


def bench_decode_small_batches(copy_bw) -> list[dict]:
    """Small batches (the latency workload): split-K decode over several split counts."""
    return [row for batch in (1, 8) for row in _decode_splits(copy_bw, batch)]


def _decode_splits(copy_bw, batch, context=4096, q_heads=32, kv_heads=8, dim=128):
    k, v = (torch.randn(batch, context, kv_heads, dim, device=DEVICE, dtype=DTYPE) for _ in "kv")
    k_cache, v_cache, tables = paged_from_dense(k, v)
    q = torch.randn(batch, q_heads, dim, device=DEVICE, dtype=DTYPE)
    lens = torch.full((batch,), context, dtype=torch.int32, device=DEVICE)
    moved = 2 * batch * context * kv_heads * dim * 2
    default = decode_mod._num_splits(q, k_cache, tables)
    rows = []
    for splits in sorted({1, 4, 8, 16, 32, 64, default}):
        ms = bench_ms(
            lambda n=splits: decode_mod.decode_attention(
                q, k_cache, v_cache, tables, lens, dim**-0.5, num_splits=n
            )
        )
        rows.append({"batch": batch, "splits": splits, "us": ms * 1e3,
                     "fraction_of_copy": moved / (ms * 1e-3) / copy_bw,
                     "default": splits == default})  # fmt: skip
        print(f"decode batch {batch} splits {splits}: {ms * 1e3:.1f} us", flush=True)
    return rows


def bench_decode_fp8(batches=(1, 8, 64)) -> list[dict]:
    """Default launches over an fp8 cache (per-head absmax scales) vs over the bf16 one:
    split-K at every batch, the ragged kernel at the largest."""
    return [row for b in batches for row in _decode_fp8(b, ragged=b == max(batches))]


def _decode_fp8(batch, ragged, context=4096, q_heads=32, kv_heads=8, dim=128) -> list[dict]:
    k, v = (torch.randn(batch, context, kv_heads, dim, device=DEVICE, dtype=DTYPE) for _ in "kv")
    k_cache, v_cache, tables = paged_from_dense(k, v)
    del k, v
    scales = [c.float().abs().amax(dim=(0, 1, 3)) / torch_ref.FP8_MAX for c in (k_cache, v_cache)]
    kv8 = {"k_scale": scales[0], "v_scale": scales[1]}
    fp8 = [torch_ref.quantize_fp8(c, s) for c, s in zip((k_cache, v_cache), scales, strict=True)]
    q = torch.randn(batch, q_heads, dim, device=DEVICE, dtype=DTYPE)
    starts = torch.arange(batch + 1, dtype=torch.int32, device=DEVICE)
    lens = torch.full((batch,), context, dtype=torch.int32, device=DEVICE)
    scale = dim**-0.5
    expected = torch_ref.paged_attention_ref(q, *fp8, tables, starts, lens, scale, **kv8)
    runs = {
        "split": lambda caches, **s: decode_mod.decode_attention(
            q, *caches, tables, lens, scale, **s
        )
    }
    if ragged:
        runs["paged"] = lambda caches, **s: paged_mod.paged_attention(
            q, *caches, tables, starts, lens, scale, max_query_len=1, **s
        )
    rows = []
    for name, run in runs.items():
        bf16_ms = bench_ms(lambda run=run: run((k_cache, v_cache)))
        ms = bench_ms(lambda run=run: run(fp8, **kv8))
        ok = rel_err(run(fp8, **kv8), expected) < MAX_REL_ERR
        rows.append({"batch": batch, "kernel": name, "us": ms * 1e3, "bf16_us": bf16_ms * 1e3,
                     "ok": ok})  # fmt: skip
        print(f"decode {name} fp8 batch {batch}: {ms * 1e3:.1f} us (bf16 {bf16_ms * 1e3:.1f})")
    torch.cuda.empty_cache()
    return rows


def bench_elementwise(tokens=4096, hidden=4096, inner=14336) -> list[dict]:
    """Each kernel vs its torch reference on Mistral-7B-shaped inputs of 4096 tokens."""
    x = torch.randn(tokens, hidden, device=DEVICE, dtype=DTYPE)
    res = torch.randn_like(x)
    w = torch.randn(hidden, device=DEVICE, dtype=DTYPE)
    gate_up = torch.randn(tokens, 2 * inner, device=DEVICE, dtype=DTYPE)
    qkv = torch.randn(tokens, 48, 128, device=DEVICE, dtype=DTYPE)
    q, k, v = qkv.split([32, 8, 8], dim=1)  # (T, H, D) views, as the models pass them
    angles = torch.rand(8192, 64, device=DEVICE) * 6.3
    cos_sin = torch.cat((angles.cos(), angles.sin()), -1)
    pos = torch.randint(0, 8192, (tokens,), device=DEVICE)
    caches = [torch.zeros(tokens // 16 + 1, 16, 8, 128, device=DEVICE, dtype=DTYPE) for _ in "kv"]
    slots = torch.randperm(tokens + 16, device=DEVICE)[:tokens]
    rope_args = (q, k, v, pos, cos_sin, *caches, slots)
    cases = [  # name, kernel, reference, bytes moved
        ("rms_norm", lambda: rms_norm(x, w, 1e-6, res),
         lambda: torch_ref.rms_norm_ref(x, w, 1e-6, res), 4 * x.nbytes),
        ("silu_and_mul", lambda: silu_and_mul(gate_up),
         lambda: torch_ref.silu_and_mul_ref(gate_up), gate_up.nbytes * 3 // 2),
        ("rope_kv_write", lambda: rope_kv_write(*rope_args),
         lambda: torch_ref.rope_kv_write_ref(*rope_args), 2 * qkv.nbytes),
    ]  # fmt: skip
    return [_time_elementwise(*case) for case in cases]


def _time_elementwise(name, kernel, ref, nbytes) -> dict:
    out, expected = kernel(), ref()
    err = 0.0  # in place (rope): checked apart by check_rope_once
    if out is not None:
        err = max(rel_err(a, b) for a, b in zip(_tuple(out), _tuple(expected), strict=True))
    ms, ref_ms = bench_ms(kernel), bench_ms(ref)
    print(f"{name}: {ms:.3f} ms vs torch {ref_ms:.3f} ms, rel err {err:.1e}", flush=True)
    return {"kernel": name, "ms": ms, "ref_ms": ref_ms, "speedup": ref_ms / ms,
            "gbps": nbytes / (ms * 1e-3) / 1e9, "rel_err": err}  # fmt: skip


def _tuple(x):
    return x if isinstance(x, tuple) else (x,)


def check_rope_once() -> float:
    """rope_kv_write against its reference on fresh copies of the same inputs."""
    tokens, dim = 1000, 128
    qkv = torch.randn(tokens, 48, dim, device=DEVICE, dtype=DTYPE)
    angles = torch.rand(4096, dim // 2, device=DEVICE) * 6.3
    cos_sin = torch.cat((angles.cos(), angles.sin()), -1)
    pos = torch.randint(0, 4096, (tokens,), device=DEVICE)
    slots = torch.randperm(tokens + 24, device=DEVICE)[:tokens]
    results = []
    for fn in (rope_kv_write, torch_ref.rope_kv_write_ref):
        t = qkv.clone()
        caches = [torch.zeros(64, 16, 8, dim, device=DEVICE, dtype=DTYPE) for _ in "kv"]
        q, k, v = t.split([32, 8, 8], dim=1)
        fn(q, k, v, pos, cos_sin, *caches, slots)
        results.append(torch.cat([t.flatten(), caches[0].flatten(), caches[1].flatten()]))
    return rel_err(results[0], results[1])


def best(rows):
    return min((r for r in rows if r["ok"]), key=lambda r: r["ms"])


def table(result) -> str:
    pre, dec = result["prefill"], result["decode"]
    lines = [f"device: {result['device']}  triton {triton.__version__}  torch {torch.__version__}"]
    lines.append(f"copy bandwidth: {result['copy_gbps']:.0f} GB/s")
    lines.append(f"prefill SDPA flash: {pre['sdpa_tflops']:.0f} TFLOP/s")
    for name, tflops in pre["sdpa_others"].items():
        lines.append(f"  (SDPA {name}: {tflops:.0f} TFLOP/s)")
    for row in pre["rows"]:
        mark = (" (default)" if row["default"] else "") + ("" if row["ok"] else " WRONG")
        ratio = row["tflops"] / pre["sdpa_tflops"]
        lines.append(
            f"  paged {row['config']}: {row['tflops']:.0f} TFLOP/s = {ratio:.2f}x SDPA{mark}"
        )
    top = best(pre["rows"])
    lines.append(f"  best {top['config']}: {top['tflops'] / pre['sdpa_tflops']:.2f}x SDPA")
    lines.append(f"decode (torch ref {dec['torch_ref_ms']:.2f} ms):")
    for row in dec["rows"]:
        mark = (" (default)" if row["default"] else "") + ("" if row["ok"] else " WRONG")
        lines.append(
            f"  {row['config']}: {row['ms']:.3f} ms = {row['fraction_of_copy']:.2f} of copy{mark}"
        )
    top = best(dec["rows"])
    lines.append(f"  best {top['config']}: {top['fraction_of_copy']:.2f} of copy")
    for row in result["decode_small"]:
        mark = " (default)" if row["default"] else ""
        lines.append(f"decode batch {row['batch']}, {row['splits']} splits: {row['us']:.1f} us"
                     f" = {row['fraction_of_copy']:.2f} of copy{mark}")  # fmt: skip
    for row in result["decode_fp8"]:
        mark = "" if row["ok"] else " WRONG"
        lines.append(f"decode {row['kernel']} over fp8, batch {row['batch']}: {row['us']:.1f} us"
                     f" ({row['bf16_us'] / row['us']:.2f}x bf16){mark}")  # fmt: skip
    for row in result["elementwise"]:
        lines.append(f"{row['kernel']}: {row['ms']:.3f} ms vs torch {row['ref_ms']:.3f} ms "
                     f"({row['speedup']:.1f}x, {row['gbps']:.0f} GB/s)")  # fmt: skip
    lines.append(f"rope_kv_write rel err vs reference: {result['rope_rel_err']:.1e}")
    return "\n".join(lines)


def main() -> None:
    assert torch.cuda.is_available(), "this benchmark needs a CUDA GPU"
    torch.manual_seed(0)
    if len(sys.argv) == 5 and sys.argv[1] == "--prefill":
        batch, seq, kv_heads = map(int, sys.argv[2:])
        pre = bench_prefill(batch, 32, seq, 128, kv_heads, PREFILL_SWEEP)
        for row in sorted(pre["rows"], key=lambda r: r["ms"]):
            mark = (" (default)" if row["default"] else "") + ("" if row["ok"] else " WRONG")
            print(f"B{batch} S{seq} kv{kv_heads} {row['config']}: {row['ms'] * 1e3:.0f} us "
                  f"{row['tflops']:.0f} TFLOP/s = {row['tflops'] / pre['sdpa_tflops']:.2f}x "
                  f"SDPA flash ({pre['sdpa_tflops']:.0f}){mark}")  # fmt: skip
        return
    copy_bw = copy_bandwidth()
    result = {"device": torch.cuda.get_device_name(), "copy_gbps": copy_bw / 1e9}
    result["prefill"] = bench_prefill()
    torch.cuda.empty_cache()
    result["decode"] = bench_decode(copy_bw)
    torch.cuda.empty_cache()
    result["decode_small"] = bench_decode_small_batches(copy_bw)
    result["decode_fp8"] = bench_decode_fp8()
    result["elementwise"] = bench_elementwise()
    result["rope_rel_err"] = check_rope_once()
    print(table(result))
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "kernels.json"), "w") as f:
            json.dump(result, f, indent=2, default=str)


if __name__ == "__main__":
    main()

"""GPU benchmark of the FP8-weight GEMMs at the Mistral-7B shapes, measured in one run.

For each projection (qkv 4096->6144, o 4096->4096, gate_up 4096->28672, down 14336->4096)
and M = 1, 16, 64, 256, 4096 rows: bf16 `F.linear` (the baseline), `torch._scaled_mm`
with per-token activation quantization (also with use_fast_accum), the Triton weight-only
kernel (bf16 activations), the Triton W8A8 kernel (with the same quantization), the Triton
W8A8 kernel quantizing x per tile itself, and what `fp8_linear` picks
(`fp8_gemm.choose_backend`). Each is checked against the torch reference before it is
timed (CUDA graphs, so launch overhead counts as in the engine's decode steps). With
--sweep, the tiles of the Triton W8A8 kernel are swept at each M up to 64 as well, to
move `fp8_gemm.tile_for` or `TRITON_MAX_M`.

Also: the device's copy bandwidth, and per M the sum over the 32 layers of the picked
backend against FP8's weight-read floor (the weights of those GEMMs read once).
Prints a table last and writes $OUT/bench_fp8.json.

--bf16 instead weighs the same Triton kernel over bf16 weights against cuBLAS (`F.linear`)
at decode sizes (M = 1, 16), on the Mistral-7B projections at TP=1 and as one TP=2 rank
holds them (Mixtral-8x7B's attention has the TP=2 qkv and o shapes), sweeping BF16_SWEEP.
Usage: python scripts/bench_fp8.py [--sweep | --bf16] [--rows 1 2 4 8 16]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.testing

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench_common import copy_bandwidth  # noqa: E402

from mii.kernels import fp8_gemm  # noqa: E402
from mii.kernels.fp8_ref import fp8_linear_ref, quantize_rows  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
ROWS = (1, 16, 64, 256, 4096)
LAYERS = 32
MAX_REL_ERR = 5e-2  # W8A8 rounds the activations to fp8 too
SWEEP = [  # for the Triton W8A8 kernel (per-token quantization), at M <= 64
    fp8_gemm.Fp8Tile(16, 32, 256, 4, 5),
    fp8_gemm.Fp8Tile(16, 128, 256, 4, 3),
    fp8_gemm.Fp8Tile(16, 64, 256, 4, 4, split_k=2),
    fp8_gemm.Fp8Tile(16, 128, 256, 8, 3, split_k=4),
    fp8_gemm.Fp8Tile(64, 64, 128, 4, 4),
]


BF16_SHAPES = {
    "qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336),
    "tp2 qkv": (3072, 4096), "tp2 o": (4096, 2048), "tp2 gate_up": (14336, 4096),
    "tp2 down": (4096, 7168),
}  # fmt: skip
BF16_ROWS = (1, 16)
BF16_SWEEP = [
    fp8_gemm.Fp8Tile(16, 32, 256, 4, 4),
    fp8_gemm.Fp8Tile(16, 64, 128, 4, 4),
    fp8_gemm.Fp8Tile(16, 128, 128, 4, 3),
    fp8_gemm.Fp8Tile(16, 64, 256, 4, 3, split_k=2),
    fp8_gemm.Fp8Tile(16, 128, 128, 8, 3, split_k=4),
]


def bf16_shape(name: str, n: int, k: int, m: int) -> tuple[float, float, object]:
    """(cuBLAS ms, best Triton ms, its tile) for one bf16 projection at M rows."""
    gen = torch.Generator(device="cuda").manual_seed(n + k + m)
    w = torch.randn(n, k, device="cuda", generator=gen, dtype=torch.bfloat16) * 0.02
    x = torch.randn(m, k, device="cuda", generator=gen, dtype=torch.bfloat16)
    ref = F.linear(x.float(), w.float())
    base = bench_ms(lambda: F.linear(x, w))
    best, best_tile = float("inf"), None
    for tile in BF16_SWEEP:
        try:
            assert rel_err(fp8_gemm.small_m_linear(x, w, None, tile), ref) < 1e-2
            t = bench_ms(lambda t=tile: fp8_gemm.small_m_linear(x, w, None, t))
        except Exception as exc:  # noqa: BLE001 (a tile that fails is reported)
            print(f"{name} M={m} {tuple(tile)}: {type(exc).__name__}: {exc}")
            continue
        if t < best:
            best, best_tile = t, tile
    return base, best, best_tile


def bench_bf16(gbps: float) -> list[str]:
    """cuBLAS against the best swept Triton tile per shape, bf16 weights, M <= 16."""
    lines = [f"copy bandwidth {gbps:.0f} GB/s; bf16 weights, ms", ""]
    lines.append(f"{'shape':12} {'M':>3} {'cuBLAS':>9} {'triton':>9} {'ratio':>6}  best tile")
    totals: dict[tuple[str, int], list[float]] = {}
    for m in BF16_ROWS:
        for name, (n, k) in BF16_SHAPES.items():
            base, best, tile = bf16_shape(name, n, k, m)
            group = totals.setdefault(("tp2" if name.startswith("tp2") else "tp1", m), [0, 0, 0])
            group[0] += base
            group[1] += min(base, best)
            group[2] += n * k * 2 / gbps / 1e6
            lines.append(f"{name:12} {m:>3} {base:9.4f} {best:9.4f} {best / base:6.2f}  "
                         f"{tuple(tile) if tile else '-'}")  # fmt: skip
            print(lines[-1], flush=True)
    lines += ["", "per token, 32 layers (ms): cuBLAS, the faster of the two per shape, floor"]
    for (group, m), (base, mixed, floor) in totals.items():
        lines.append(f"  {group} M={m:<3} {base * LAYERS:8.3f} {mixed * LAYERS:8.3f} "
                     f"{floor * LAYERS:8.3f}")  # fmt: skip
    return lines


def bench_ms(fn) -> float:
    try:
        return triton.testing.do_bench_cudagraph(fn, rep=100, return_mode="median")
    except Exception:  # noqa: BLE001 (some torch ops refuse capture: time them eagerly)
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).norm() / ref.norm()).item()


def bench_shape(name: str, n: int, k: int, m: int, sweep: bool) -> dict:
    gen = torch.Generator(device="cuda").manual_seed(m + n)
    w = torch.randn(n, k, device="cuda", generator=gen, dtype=torch.bfloat16) * 0.02
    x = torch.randn(m, k, device="cuda", generator=gen, dtype=torch.bfloat16)
    q, scale = quantize_rows(w)
    ref = fp8_linear_ref(x.float(), q, scale)
    row = {"shape": name, "m": m, "n": n, "k": k, "bf16": bench_ms(lambda: F.linear(x, w))}
    for backend in fp8_gemm.BACKENDS:
        try:
            out = fp8_gemm.fp8_linear(x, q, scale, backend=backend)
        except Exception as exc:  # noqa: BLE001 (a backend this torch lacks is reported)
            row[backend] = float("nan")
            print(f"{backend} {name} M={m}: {type(exc).__name__}: {exc}", flush=True)
            continue
        err = rel_err(out, ref)
        assert err < MAX_REL_ERR, f"{backend} {name} M={m}: rel err {err:.3g}"
        row[backend] = bench_ms(lambda b=backend: fp8_gemm.fp8_linear(x, q, scale, backend=b))
    row["picked"] = fp8_gemm.choose_backend(m, n, k, x.dtype)
    timed = [b for b in fp8_gemm.BACKENDS if row[b] == row[b]]  # not NaN
    row["fastest"] = min(timed, key=lambda b: row[b])
    row["tile"] = str(tuple(fp8_gemm.tile_for(m, n)))
    if sweep and m <= 64:
        row["sweep"] = sweep_tiles(x, q, scale, ref)
    return row


def w8a8(x, q, scale, tile):
    """The `triton_w8a8` backend with the tile given."""
    qx, x_scale = fp8_gemm.quantize_rows(x)
    return fp8_gemm.fp8_gemm(qx, q, scale, a_scale=x_scale, out_dtype=x.dtype, tile=tile)


def sweep_tiles(x, q, scale, ref) -> dict[str, float]:
    times = {}
    for tile in SWEEP:
        if tile.block_m > max(16, 2 * x.shape[0]):
            continue
        try:
            times[str(tuple(tile))] = bench_ms(lambda t=tile: w8a8(x, q, scale, t))
            assert rel_err(w8a8(x, q, scale, tile), ref) < MAX_REL_ERR
        except Exception as exc:  # noqa: BLE001 (a tile that does not compile is reported)
            times[str(tuple(tile))] = f"failed: {type(exc).__name__}"
    return times


def table(rows: list[dict], gbps: float) -> str:
    cols = ("bf16", *fp8_gemm.BACKENDS)
    lines = [f"copy bandwidth {gbps:.0f} GB/s (read + write)", ""]
    width = {c: max(12, len(c)) for c in cols}
    lines.append(f"{'shape':8} {'M':>5} " + " ".join(f"{c:>{width[c]}}" for c in cols)
                 + f" {'picked':>12} {'fastest':>12}  best swept tile")  # fmt: skip
    for r in rows:
        best = ""
        if "sweep" in r:
            timed = {t: v for t, v in r["sweep"].items() if isinstance(v, float)}
            if timed:
                tile = min(timed, key=timed.get)
                best = f"{tile} {timed[tile]:.4f} ms (default {r['tile']})"
        times = " ".join(f"{r[c]:>{width[c]}.4f}" for c in cols)
        lines.append(f"{r['shape']:8} {r['m']:>5} {times}"
                     + f" {r['picked']:>12} {r['fastest']:>12}  {best}")  # fmt: skip
    lines += ["", "per token of all 32 layers' GEMMs (ms), the picked backend vs FP8's floor:"]
    for m in dict.fromkeys(r["m"] for r in rows):
        picked = sum(r[r["picked"]] for r in rows if r["m"] == m) * LAYERS
        fastest = sum(r[r["fastest"]] for r in rows if r["m"] == m) * LAYERS
        bf16 = sum(r["bf16"] for r in rows if r["m"] == m) * LAYERS
        weight_bytes = sum(n * k for n, k in SHAPES.values()) * LAYERS
        floor = weight_bytes / gbps / 1e6  # as BENCHMARKS.md's floors: bytes / copy rate
        lines.append(f"  M={m:<5} fp8 picked {picked:8.3f} (fastest {fastest:8.3f})  bf16 "
                     f"{bf16:8.3f}  fp8 weight floor {floor:.3f}  picked / floor "
                     f"{picked / floor:.2f}")  # fmt: skip
        swept = [min((v for v in r.get("sweep", {}).values() if isinstance(v, float)),
                     default=None) for r in rows if r["m"] == m]  # fmt: skip
        if swept and None not in swept:
            lines.append(f"          best swept tiles {sum(swept) * LAYERS:8.3f}  / floor "
                         f"{sum(swept) * LAYERS / floor:.2f}")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", action="store_true", help="sweep the Triton kernel's tiles")
    ap.add_argument("--bf16", action="store_true", help="bf16 weights: Triton vs cuBLAS")
    ap.add_argument("--rows", type=int, nargs="+", default=list(ROWS), help="the M to time")
    args = ap.parse_args()
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__)
    gbps = copy_bandwidth() / 1e9
    if args.bf16:
        print("\n".join(bench_bf16(gbps)))
        return
    rows = []
    for m in args.rows:
        for name, (n, k) in SHAPES.items():
            rows.append(bench_shape(name, n, k, m, args.sweep))
            print(json.dumps(rows[-1]), flush=True)
    text = table(rows, gbps)
    out = os.environ.get("OUT")
    with open(os.path.join(out, "bench_fp8.json") if out else "bench_fp8.json", "w") as f:
        json.dump({"copy_gbps": gbps, "rows": rows}, f, indent=2)
    print(text)


if __name__ == "__main__":
    main()

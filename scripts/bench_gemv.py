"""GPU benchmark of the decode GEMV (mii/kernels/gemv.py) against cuBLAS and the FP8 path
the engine runs at decode, at M = 1, 2, 4 rows.

Shapes: the Mistral-7B projections (qkv 4096->6144, o 4096->4096, gate_up 4096->28672,
down 14336->4096), the same as one tensor-parallel rank of two holds them (N halved for qkv
and gate_up, K halved for o and down), and Mixtral-8x7B's attention at TP=2 (qkv 4096->3072,
o 2048->4096). Per shape and M, each checked against the float32 reference, then timed:

- cublas: torch.matmul(x, w.t()) over bf16 weights
- gemv: kernels/gemv.py over the same bf16 weights
- fp8_linear: kernels/fp8_gemm.fp8_linear over float8 weights with per-row scales (what
  kernels/dispatch.fp8_linear runs on CUDA: `choose_backend` picks by M)
- gemv_fp8: kernels/gemv.py over the same float8 weights
- gemv_fp8_deferred: the same with `defer=True`: where K splits, the partial sums stored
  and no epilogue (the reader after it adds them up: `SplitSums`), so the difference to
  gemv_fp8 is what the epilogue costs
- gemv_deferred: the bf16 GEMV with `defer=True` (the engine defers float8 GEMVs only)

`--norm` times each method with the residual add and RMSNorm after it (kernels/rms_norm.py,
given the `SplitSums` where deferred): the pair the engine runs for the output and down
projections, so a deferred row shows what leaving the splits to the norm costs or saves.

Timing as the engine's decode steps run: PER_GRAPH calls captured in one CUDA graph, replayed
REPLAYS times. The calls cycle over enough copies of the weights that they do not stay in L2
between calls (a decode step reads each layer's weights once). Reported: microseconds per
call and GB/s of weight bytes read, against the device-to-device copy bandwidth measured in
the same run (read + write bytes); and per M the sum over 32 layers of the Mistral-7B TP=1
projections (and of the TP=2 rank's) against the weights' read floor at copy bandwidth.
--sweep also times a set of tiles per shape around `gemv_tile`'s and prints the best.
Writes $OUT/bench_gemv.json.

    python scripts/bench_gemv.py [--sweep] [--norm] [--rows 1 2 4] [--shapes qkv tp2_o ...]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import copy_bandwidth, graph_timed, write_json  # noqa: E402

from mii.kernels import gemv as gemv_mod  # noqa: E402
from mii.kernels.fp8_ref import quantize_rows  # noqa: E402

SHAPES = {  # name: (N, K, group)
    "qkv": (6144, 4096, "mistral tp1"),
    "o": (4096, 4096, "mistral tp1"),
    "gate_up": (28672, 4096, "mistral tp1"),
    "down": (4096, 14336, "mistral tp1"),
    "tp2_qkv": (3072, 4096, "mistral tp2"),
    "tp2_o": (4096, 2048, "mistral tp2"),
    "tp2_gate_up": (14336, 4096, "mistral tp2"),
    "tp2_down": (4096, 7168, "mistral tp2"),
}
"""Mixtral-8x7B's attention at TP=2 is tp2_qkv (3072x4096) and tp2_o (4096x2048)."""
ROWS = (1, 2, 4)
METHODS = ("cublas", "gemv", "gemv_deferred", "fp8_linear", "gemv_fp8", "gemv_fp8_deferred")
LAYERS = 32
REPLAYS, PER_GRAPH = 20, 50
COLD_BYTES = 256 << 20  # weight copies cycled per graph: more than an H100's 50 MB L2
MAX_REL_ERR = {"cublas": 1e-2, "gemv": 1e-2, "gemv_deferred": 1e-2, "fp8_linear": 5e-2,
               "gemv_fp8": 1e-2, "gemv_fp8_deferred": 1e-2}  # fmt: skip
"""fp8_linear at decode sizes quantizes the activations to float8 too (W8A8)."""


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return ((out.float() - ref).norm() / ref.norm()).item()


class Operands:
    """x (M, K) bf16; bf16 weights and their float8 quantization, each in enough copies to
    cycle through without L2 hits."""

    def __init__(self, m: int, n: int, k: int, hot: bool = False, norm: bool = False):
        gen = torch.Generator(device="cuda").manual_seed(m * 131 + n + k)
        self.x = torch.randn(m, k, device="cuda", generator=gen, dtype=torch.bfloat16)
        self.norm = norm  # each call followed by the residual add and RMSNorm (--norm)
        self.residual = torch.randn(m, n, device="cuda", generator=gen, dtype=torch.bfloat16)
        self.norm_weight = torch.rand(n, device="cuda", generator=gen, dtype=torch.bfloat16)
        w = torch.randn(n, k, device="cuda", generator=gen, dtype=torch.bfloat16) * 0.02
        q, scale = quantize_rows(w)
        self.ref = self.x.float() @ w.float().t()
        self.ref_fp8 = self.x.float() @ (q.float() * scale[:, None]).t()
        copies = max(1, min(PER_GRAPH, -(-COLD_BYTES // (n * k))))  # by the fp8 size
        if hot:  # one copy each, read again every call: from L2 where it fits (--hot)
            copies = 1
        self.w = [w] + [w.clone() for _ in range(max(1, copies // 2) - 1)]
        self.q = [q] + [q.clone() for _ in range(copies - 1)]
        self.scale = scale

    def call(self, method: str, tile=None):
        """fn(i) running `method` on the i-th weight copy (cycled); with `norm`, the RMSNorm
        of its y (or of its `SplitSums`) plus the residual after it."""
        product = self._product(method, tile)
        if not self.norm:
            return product
        from mii.kernels.rms_norm import rms_norm

        residual, weight = self.residual, self.norm_weight
        return lambda i: rms_norm(product(i), weight, 1e-5, residual)

    def _product(self, method: str, tile=None):
        x, ws, qs, scale = self.x, self.w, self.q, self.scale
        if method == "cublas":
            return lambda i: torch.matmul(x, ws[i % len(ws)].t())
        if method == "gemv":
            return lambda i: gemv_mod.gemv(x, ws[i % len(ws)], tile=tile)
        if method == "gemv_deferred":
            return lambda i: gemv_mod.gemv(x, ws[i % len(ws)], tile=tile, defer=True)
        if method == "fp8_linear":
            from mii.kernels.fp8_gemm import fp8_linear

            return lambda i: fp8_linear(x, qs[i % len(qs)], scale)
        if method == "gemv_fp8":
            return lambda i: gemv_mod.gemv(x, qs[i % len(qs)], scale, tile=tile)
        if method == "gemv_fp8_deferred":
            return lambda i: gemv_mod.gemv(x, qs[i % len(qs)], scale, tile=tile, defer=True)
        raise ValueError(method)

    def check(self, method: str, tile=None) -> float:
        """The product's error (the norm after it, with --norm, is not checked here: its
        kernel tests hold a SplitSums' norm to the norm of y, bit for bit)."""
        out = self._product(method, tile)(0)
        out = out.total() if isinstance(out, gemv_mod.SplitSums) else out
        err = rel_err(out, self.ref_fp8 if "fp8" in method else self.ref)
        assert err < MAX_REL_ERR[method], f"{method} {tile}: rel err {err:.3g}"
        return err


def sweep_tiles(m: int, n: int, k: int, itemsize: int) -> list:
    """Tiles around the default: BLOCK_N 16/32/64 x 512/1024-byte rows x the default split
    halved/kept/doubled (warps by `gemv.tile_warps`), and the default with the other warp
    count or 1/3 stages."""
    base = gemv_mod.gemv_tile(m, n, k, itemsize, gemv_mod._sm_count(torch.device("cuda")))
    tiles = {base}
    for block_n in (16, 32, 64):
        for row_bytes in (512, 1024):
            block_k = min(row_bytes // itemsize, triton.next_power_of_2(k))
            k_tiles = triton.cdiv(k, block_k)
            warps = gemv_mod.tile_warps(m, block_n, block_k)
            for split in {max(1, base.split_k // 2), base.split_k, base.split_k * 2}:
                split = min(split, k_tiles)
                if (split - 1) * triton.cdiv(k_tiles, split) < k_tiles:
                    tiles.add(gemv_mod.GemvTile(block_n, block_k, split, warps, 2))
    tiles |= {base._replace(num_warps=12 - base.num_warps), base._replace(num_stages=1),
              base._replace(num_stages=3)}  # fmt: skip
    return sorted(tiles)


def bench_shape(name: str, m: int, sweep: bool, hot: bool = False, norm: bool = False) -> dict:
    n, k, group = SHAPES[name]
    ops = Operands(m, n, k, hot, norm)
    row = {"shape": name, "group": group, "m": m, "n": n, "k": k, "norm": norm}
    sms = gemv_mod._sm_count(torch.device("cuda"))
    row["tile_bf16"] = tuple(gemv_mod.gemv_tile(m, n, k, 2, sms))
    row["tile_fp8"] = tuple(gemv_mod.gemv_tile(m, n, k, 1, sms))
    for method in METHODS:
        try:
            row[f"{method}_err"] = ops.check(method)
            row[method] = graph_timed(ops.call(method), PER_GRAPH, REPLAYS)
        except Exception as exc:  # noqa: BLE001 (a method that fails is reported)
            row[method] = float("nan")
            print(f"{name} M={m} {method}: {type(exc).__name__}: {exc}", flush=True)
    if sweep:
        for method, itemsize in (("gemv", 2), ("gemv_fp8", 1)):
            times = {}
            for tile in sweep_tiles(m, n, k, itemsize):
                try:
                    ops.check(method, tile)
                    call = ops.call(method, tile)
                    times[str(tuple(tile))] = graph_timed(call, PER_GRAPH, REPLAYS)
                except Exception as exc:  # noqa: BLE001 (a tile that fails is reported)
                    print(f"{name} M={m} {method} {tuple(tile)}: {type(exc).__name__}: {exc}")
            row[f"{method}_sweep"] = times
            if times:
                best = min(times, key=times.get)
                row[f"{method}_best"] = (best, times[best])
    del ops
    torch.cuda.empty_cache()
    return row


def table(rows: list[dict], gbps: float) -> str:
    lines = [f"{torch.cuda.get_device_name()}: copy bandwidth {gbps:.0f} GB/s (read + write); "
             f"us per call (weight GB/s), CUDA graphs of {PER_GRAPH} calls, L2-cold weights"
             + ("; each call with the RMSNorm after it" if rows and rows[0].get("norm") else ""),
             ""]  # fmt: skip
    lines.append(f"{'shape':12} {'M':>2} " + " ".join(f"{c:>17}" for c in METHODS)
                 + "  gemv / cublas, gemv_fp8 / fp8_linear")  # fmt: skip
    for r in rows:
        cells = []
        for c in METHODS:
            nbytes = r["n"] * r["k"] * (1 if "fp8" in c else 2)
            cells.append(f"{r[c]:8.2f} ({nbytes / r[c] / 1e3:5.0f})")
        ratios = f"{r['gemv'] / r['cublas']:5.2f} {r['gemv_fp8'] / r['fp8_linear']:5.2f}"
        lines.append(f"{r['shape']:12} {r['m']:>2} " + " ".join(f"{c:>17}" for c in cells)
                     + f"  {ratios}")  # fmt: skip
        for method in ("gemv", "gemv_fp8"):
            if f"{method}_best" in r:
                tile, us = r[f"{method}_best"]
                default = r["tile_bf16" if method == "gemv" else "tile_fp8"]
                lines.append(f"{'':16}{method} best swept {tile} {us:.2f} us "
                             f"(default {default} {r[method]:.2f})")  # fmt: skip
    lines += ["", f"per token, {LAYERS} layers (us): each method; weight floor at copy rate"]
    for group in dict.fromkeys(r["group"] for r in rows):
        for m in dict.fromkeys(r["m"] for r in rows):
            sel = [r for r in rows if r["group"] == group and r["m"] == m]
            if not sel:
                continue
            sums = {c: sum(r[c] for r in sel) * LAYERS for c in METHODS}
            params = sum(r["n"] * r["k"] for r in sel) * LAYERS
            floor16, floor8 = 2 * params / gbps / 1e3, params / gbps / 1e3
            text = "  ".join(f"{c} {v:8.1f}" for c, v in sums.items())
            lines.append(f"  {group} M={m}: {text}  floor bf16 {floor16:8.1f} fp8 {floor8:8.1f}")
            for method in ("gemv", "gemv_fp8"):
                if all(f"{method}_best" in r for r in sel):
                    best = sum(r[f"{method}_best"][1] for r in sel) * LAYERS
                    lines.append(f"{'':8}{method} best swept tiles {best:8.1f}")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sweep", action="store_true", help="sweep the gemv tiles per shape")
    ap.add_argument("--hot", action="store_true", help="the same weights every call (L2)")
    ap.add_argument("--norm", action="store_true", help="each call followed by the RMSNorm")
    ap.add_argument("--rows", type=int, nargs="+", default=list(ROWS), help="the M to time")
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    return ap.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_gemv needs a CUDA GPU")
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
    gbps = copy_bandwidth() / 1e9
    torch.cuda.empty_cache()
    rows = []
    for m in args.rows:
        for name in args.shapes:
            rows.append(bench_shape(name, m, args.sweep, args.hot, args.norm))
            brief = {c: round(rows[-1][c], 2) for c in METHODS}
            print(f"{name} M={m} {brief}", flush=True)
    text = table(rows, gbps)
    write_json("bench_gemv.json", {"device": torch.cuda.get_device_name(), "copy_gbps": gbps,
                                   "rows": rows, "table": text})  # fmt: skip
    print(text)


if __name__ == "__main__":
    main()

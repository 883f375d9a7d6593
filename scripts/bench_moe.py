"""GPU benchmark of the fused MoE kernel (kernels/fused_moe.py) on one Mixtral-8x7B layer as
a TP=2 rank runs it (8 experts, top-2, hidden 4096, intermediate 14336 / 2; `--inner 14336`
for TP=1), bf16, at 1, 16, 256 and 4096 tokens, in one run:

- fused: the Triton layer (routing included) at its default tiles and at alternatives
  swept around them (the default is marked); `route` times the routing kernel alone;
- loop: the plain-torch formulation (`fused_moe_ref`: one sort by expert, per expert an
  index_select, two matmuls and an index_add);
- grouped_mm: torch._grouped_mm over the tokens sorted by expert (what transformers 5 runs
  by default), where this torch has it;
- fp8: the Triton layer over float8 experts (one scale per expert and row, quantized from
  the same weights; checked against the reference over those float8 experts), default tiles;
- gemv / gemv fp8 (1 to 4 tokens, `moe_gemv.MAX_TOKENS`): the routing kernel, the two expert
  GEMVs of kernels/moe_gemv.py and the sum over the top k (what `fused_moe` runs for one
  token with `MII_MOE_GEMV=1`, off by default), over the bf16 and the float8 experts;
- floor: the bytes of the experts the step's tokens picked over the copy bandwidth
  measured in the same run (the bound at small batch); TFLOP/s against the bf16 matmul peak
  (the bound at large batch).

`--graphs` times every candidate as CUDA graph replays, as the engine's decode steps run
them (at one token the Python launches of do_bench's eager calls can outlast the kernels);
the loop and grouped_mm formulations do not capture and are left out there.

Every candidate is checked against the float32 reference before it is timed. Prints a table
last; writes bench_moe.json under $OUT when set.

    python scripts/bench_moe.py [--inner 7168] [--tokens 1 16 256 4096]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import triton
import triton.testing
from bench_common import graph_timed, measure_peaks, write_json

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mii.kernels import fused_moe as moe  # noqa: E402
from mii.kernels import moe_gemv  # noqa: E402
from mii.kernels.fused_moe_ref import fused_moe_ref, quantize_experts, route_ref  # noqa: E402
from mii.kernels.torch_ref import silu_and_mul_ref  # noqa: E402

DTYPE, DEVICE = torch.bfloat16, "cuda"
MAX_REL_ERR = 2e-2
T = moe.GemmTile
SWEEP = {  # alternatives per row-block size; the default of each step size is added
    16: [
        moe.MoeConfig(16, T(32, 128, 4, 4), T(32, 128, 4, 4)),
        moe.MoeConfig(16, T(64, 256, 4, 3), T(64, 256, 4, 3)),
        moe.MoeConfig(16, T(128, 128, 8, 4), T(128, 128, 4, 4)),
        moe.MoeConfig(16, T(32, 256, 4, 4), T(32, 256, 4, 4)),
    ],
    32: [
        moe.MoeConfig(32, T(64, 64, 4, 4), T(64, 128, 4, 4)),
        moe.MoeConfig(16, T(64, 128, 4, 4), T(128, 128, 4, 4)),
    ],
    64: [
        moe.MoeConfig(64, T(128, 64, 4, 4), T(128, 64, 4, 4)),
        moe.MoeConfig(64, T(64, 64, 4, 4), T(256, 64, 8, 3)),
        moe.MoeConfig(32, T(64, 128, 4, 4), T(128, 128, 4, 4)),
    ],
    128: [
        moe.MoeConfig(128, T(128, 64, 8, 4), T(256, 64, 8, 3)),
        moe.MoeConfig(128, T(64, 64, 4, 4), T(128, 64, 4, 4)),
        moe.MoeConfig(64, T(128, 64, 4, 3), T(256, 64, 8, 3)),
        moe.MoeConfig(128, T(128, 32, 8, 4), T(128, 64, 8, 4)),
    ],
}


GRAPHS = False
"""--graphs: time each candidate as CUDA graph replays (as the engine's decode steps run it:
no launch overhead from Python), not by triton's do_bench (eager, L2 flushed)."""


def bench_ms(fn) -> float:
    if GRAPHS:
        return graph_timed(lambda i: fn(), per_graph=20, replays=10) / 1000
    return triton.testing.do_bench(fn, warmup=10, rep=100, return_mode="median")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def grouped_mm_moe(x, logits, gate_up, down, top_k, renormalize):
    """The experts through torch._grouped_mm, as transformers 5's default implementation:
    entries sorted by expert, two grouped GEMMs, the weighted rows added back per token."""
    routing = route_ref(logits, top_k, renormalize)
    experts, order = routing.experts.flatten().sort()
    rows = order // top_k
    counts = torch.histc(experts.int(), bins=gate_up.shape[0], min=0, max=gate_up.shape[0] - 1)
    offsets = counts.cumsum(0, dtype=torch.int32)
    h = torch._grouped_mm(x[rows], gate_up.transpose(1, 2), offs=offsets)  # (T*k, 2I)
    y = torch._grouped_mm(silu_and_mul_ref(h), down.transpose(1, 2), offs=offsets)  # (T*k, H)
    y = y.float() * routing.weights.flatten()[order, None]
    return torch.zeros_like(x, dtype=torch.float32).index_add_(0, rows, y).to(x.dtype)


def gemv_moe(x, logits, gate_up, down, top_k, renormalize, scales=None):
    """The decode path: the routing kernel (its sort by expert unused), the two expert GEMVs,
    the top-k sum (float32, rounded once, as expert_gemms sums)."""
    routing = moe.route(logits, top_k, renormalize, 16)
    rows = moe_gemv.expert_gemv(x, gate_up, down, routing.experts, routing.weights, scales)
    return rows.sum(dim=1) if top_k > 1 else rows[:, 0]


def make_layer(tokens, hidden, inner, experts, seed=0):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)

    def rand(*shape, scale):
        return (scale * torch.randn(*shape, generator=gen, device=DEVICE)).to(DTYPE)

    return (
        rand(tokens, hidden, scale=1.0),
        rand(tokens, experts, scale=1.0),
        rand(experts, 2 * inner, hidden, scale=hidden**-0.5),
        rand(experts, hidden, inner, scale=inner**-0.5),
    )


def timed(name, fn, expected) -> dict:
    try:
        err = rel_err(fn(), expected)
        ms = bench_ms(fn)
    except (RuntimeError, NotImplementedError, triton.runtime.errors.OutOfResources) as e:
        print(f"  {name}: unavailable ({type(e).__name__}: {str(e)[:120]})", flush=True)
        return {"name": name, "ms": None, "error": str(e)[:300]}
    ok = err < MAX_REL_ERR
    print(f"  {name}: {ms:.4f} ms, rel err {err:.1e}{'' if ok else ' WRONG'}", flush=True)
    return {"name": name, "ms": ms, "rel_err": err, "ok": ok}


def bench_tokens(args, tokens: int, peaks: dict) -> dict:
    x, logits, gate_up, down = make_layer(tokens, args.hidden, args.inner, args.experts)
    k, renorm = args.top_k, True
    expected = fused_moe_ref(x.float(), gate_up.float(), down.float(), route_ref(logits, k, renorm))
    default = moe.moe_config(tokens, k, args.experts)
    print(f"{tokens} tokens (default {default})", flush=True)
    rows = []
    for config in [default] + [c for c in SWEEP[default.block_m] if c != default]:
        row = timed(
            f"fused {_label(config)}",
            lambda c=config: moe.fused_moe(x, logits, gate_up, down, k, renorm, c),
            expected,
        )
        rows.append({**row, "config": config, "default": config == default})
    (fp8_gate_up, gate_up_scale), (fp8_down, down_scale) = map(quantize_experts, (gate_up, down))
    fp8, scales = (fp8_gate_up, fp8_down), (gate_up_scale, down_scale)
    fp8_expected = fused_moe_ref(x.float(), *fp8, route_ref(logits, k, renorm), scales)
    fp8_row = timed(
        "fused fp8",
        lambda: moe.fused_moe(x, logits, *fp8, k, renorm, default, scales),
        fp8_expected,
    )
    gemv = gemv_fp8 = {"name": "gemv", "ms": None, "error": "more tokens than MAX_TOKENS"}
    if tokens <= moe_gemv.MAX_TOKENS:
        gemv = timed("gemv", lambda: gemv_moe(x, logits, gate_up, down, k, renorm), expected)
        gemv_fp8 = timed(
            "gemv fp8", lambda: gemv_moe(x, logits, *fp8, k, renorm, scales), fp8_expected
        )
    route_ms = bench_ms(lambda: moe.route(logits, k, renorm, default.block_m))
    loop = {"name": "loop", "ms": None, "error": "not graph-capturable (data-dependent shapes)"}
    grouped = {"name": "grouped_mm", "ms": None, "error": "torch has no _grouped_mm"}
    if GRAPHS:
        grouped = loop
    else:
        loop = timed(
            "loop", lambda: fused_moe_ref(x, gate_up, down, route_ref(logits, k, renorm)), expected
        )
    if hasattr(torch, "_grouped_mm") and not GRAPHS:
        grouped = timed(
            "grouped_mm", lambda: grouped_mm_moe(x, logits, gate_up, down, k, renorm), expected
        )
    active = route_ref(logits, k, renorm).experts.unique().numel()
    expert_bytes = 3 * args.hidden * args.inner * x.element_size()
    floor_ms = active * expert_bytes / peaks["copy_bytes_per_s"] * 1e3
    flops = 2 * tokens * k * 3 * args.hidden * args.inner
    return {
        "tokens": tokens, "active_experts": active, "floor_ms": floor_ms, "flops": flops,
        "route_ms": route_ms, "fused": rows, "loop": loop, "grouped_mm": grouped,
        "fp8": fp8_row, "gemv": gemv, "gemv_fp8": gemv_fp8,
    }  # fmt: skip


def _label(c: moe.MoeConfig) -> str:
    g, d = c.gate_up, c.down
    return (
        f"m{c.block_m} gu{g.block_n}x{g.block_k}w{g.num_warps}s{g.num_stages} "
        f"dn{d.block_n}x{d.block_k}w{d.num_warps}s{d.num_stages}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--inner", type=int, default=14336 // 2, help="each expert's I per rank")
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 256, 4096])
    ap.add_argument(
        "--graphs",
        action="store_true",
        help="time in CUDA graphs (decode-sized steps; loop and grouped_mm skipped)",
    )
    args = ap.parse_args()
    global GRAPHS
    GRAPHS = args.graphs
    peaks = measure_peaks()
    results = [bench_tokens(args, t, peaks) for t in args.tokens]
    payload = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "triton": triton.__version__, "args": vars(args), "peaks": peaks, "results": results,
    }  # fmt: skip
    write_json("bench_moe.json", payload)
    print_table(payload)


def print_table(p: dict) -> None:
    a, peaks = p["args"], p["peaks"]
    print(
        f"\n{p['device']}  MoE layer E={a['experts']} top-{a['top_k']} H={a['hidden']} "
        f"I={a['inner']} bf16  copy {peaks['copy_bytes_per_s'] / 1e9:.0f} GB/s  "
        f"matmul {peaks['matmul_flops'] / 1e12:.0f} TFLOP/s  "
        f"timed {'in CUDA graphs' if a.get('graphs') else 'by do_bench (eager)'}"
    )
    head = ("tokens", "fused", "best", "route", "loop", "grp_mm", "floor", "x floor", "TFLOP/s",
            "fp8", "x fp8 fl", "gemv", "gemv fp8")  # fmt: skip
    print("".join(f"{h:>10}" for h in head) + "   (ms; default tiles, best swept)")
    for r in p["results"]:
        fused = next(f for f in r["fused"] if f["default"])
        ms = fused["ms"] if fused["ms"] and fused["ok"] else float("nan")
        cells = [
            r["tokens"], ms, _best(r)["ms"], r["route_ms"], r["loop"]["ms"],
            r["grouped_mm"]["ms"], r["floor_ms"], ms / r["floor_ms"], r["flops"] / ms / 1e9,
        ]  # fmt: skip
        fp8 = r["fp8"]["ms"] if r["fp8"]["ms"] and r["fp8"]["ok"] else float("nan")
        cells += [fp8, fp8 / (r["floor_ms"] / 2)]  # float8 experts: half the bytes
        cells += [_ok_ms(r.get("gemv")), _ok_ms(r.get("gemv_fp8"))]
        print("".join(_cell(c) for c in cells))
    print("gemv (route + expert GEMVs + top-k sum) against the floor (fp8: half the bytes):")
    for r in p["results"]:
        gemv, gemv_fp8 = _ok_ms(r.get("gemv")), _ok_ms(r.get("gemv_fp8"))
        if gemv is not None or gemv_fp8 is not None:
            print(
                f"  {r['tokens']:>5}: {(gemv or float('nan')) / r['floor_ms']:.2f}x, "
                f"fp8 {(gemv_fp8 or float('nan')) / (r['floor_ms'] / 2):.2f}x"
            )
    print("best tiles per step size:")
    for r in p["results"]:
        print(f"  {r['tokens']:>5}: {_best(r)['name']}")


def _ok_ms(row: dict | None) -> float | None:
    """A row's time; NaN where it was wrong, None where it did not run."""
    if row is None or row["ms"] is None:
        return None
    return row["ms"] if row["ok"] else float("nan")


def _best(result: dict) -> dict:
    passed = [f for f in result["fused"] if f["ms"] and f["ok"]]
    return min(passed, key=lambda f: f["ms"]) if passed else {"name": "none passed", "ms": None}


def _cell(value) -> str:
    if value is None:
        return f"{'-':>10}"
    return f"{value:>10}" if isinstance(value, int) else f"{value:>10.4f}"


if __name__ == "__main__":
    main()

"""The Triton kernels added for decode (and the FP8 activation quantization) compile for
Hopper (sm_90) on a machine without a GPU.

Triton's interpreter, where the kernel tests run on the CPU, accepts code that the compiler
refuses (a plain module global read inside a `@triton.jit` function ran interpreted and
failed its first GPU compile). Compiling for a `GPUTarget` needs no GPU. It runs in a
subprocess because the kernel tests' folder makes this process interpret every kernel.
A code error fails the test; a missing or too old toolchain (ptxas) skips it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.timeout(300)

SCRIPT = r"""
import inspect, json, sys
import triton
from triton.compiler import ASTSource
from triton.backends.compiler import GPUTarget
from triton.compiler.errors import CompilationError
import mii.kernels.all_reduce as ar, mii.kernels.gemv as g, mii.kernels.moe_gemv as mg
import mii.kernels.decode_attention as da
import mii.kernels.fp8_quant as fq
import mii.kernels.rms_norm as rn
import mii.kernels.rope_kv_write as rk
import mii.kernels.step_inputs as si

FLOAT32 = ("scale", "part", "weights")
INT = {"peer_data_ptr": "*i64", "peer_flags_ptr": "*i64", "flags_ptr": "*i64",
       "epoch_ptr": "*i64", "abort_at_ptr": "*i64", "count_ptr": "*i32", "experts_ptr": "*i32",
       "block_tables_ptr": "*i32", "seq_lens_ptr": "*i32", "positions_ptr": "*i64",
       "slots_ptr": "*i64", "push_data_ptr": "*i64", "push_epoch_ptr": "*i64"}
SCALARS = {"qk_scale": "fp32", "softcap_inv": "fp32", "softcap_log2e": "fp32", "eps": "fp32"}

def signature(fn, consts, dtype):
    dtype, types = (dtype, {}) if isinstance(dtype, str) else dtype  # (dtype, {name: type})
    sig = {}
    for name in inspect.signature(fn.fn).parameters:
        if name in consts:
            sig[name] = "constexpr"
        elif name in types:
            sig[name] = types[name]
        elif name.endswith("_ptr"):
            fp32 = any(word in name for word in FLOAT32)
            sig[name] = INT.get(name, "*fp32" if fp32 else "*" + dtype)
        else:
            sig[name] = SCALARS.get(name, "i32")
    return sig

def constexprs(fn, given):
    params = inspect.signature(fn.fn).parameters
    return {n: given.get(n, 1) for n, p in params.items() if "constexpr" in str(p.annotation)}

# Several splits (SINGLE_SPLIT False): the partials the merge kernel reads. A constexpr not
# given is 1: PDL on (kernels/pdl.py) unless a case says otherwise.
DECODE = {"BLOCK_SIZE": 16, "BLOCK_M": 16, "BLOCK_N": 64, "SINGLE_SPLIT": False,
          "DOT_PRECISION": "tf32", "SLIDING": False, "SOFTCAP": False, "KV_SCALED": False}
ROPE = {"HEAD_DIM": 128, "ROT_HALF": 64, "BLOCK_SIZE": 16, "BLOCK_HQ": 32, "BLOCK_HKV": 32,
        "BLOCK_HALF": 64, "BLOCK_D": 128, "BLOCK_TAIL": 1, "ROTATE": True, "QUANTIZE": False}
CASES = [
    (ar._one_shot_kernel, {"WORLD": 2, "SLOTS": 8, "TOP_K": 1, "BLOCK": 2048, "PUSH": False},
     "bf16"),
    (ar._one_shot_kernel, {"WORLD": 4, "SLOTS": 8, "TOP_K": 2, "BLOCK": 2048, "PUSH": True},
     "bf16"),
    (ar._one_shot_norm_kernel, {"WORLD": 2, "SLOTS": 8, "BLOCK_H": 4096, "PUSH": True,
                                "PUSHED": False}, "bf16"),
    # after a GEMV that pushed its rows
    (ar._one_shot_norm_kernel, {"WORLD": 2, "SLOTS": 8, "BLOCK_H": 4096, "PUSH": True,
                                "PUSHED": True}, "bf16"),
    (g._gemv_kernel, {"M": 1, "EVEN_K": True, "BLOCK_N": 16, "BLOCK_K": 256, "SPLIT_K": 4,
                      "GATED": False, "DEFER": False, "PUSH_WORLD": 0}, "bf16"),
    (g._gemv_kernel, {"M": 2, "EVEN_K": True, "BLOCK_N": 16, "BLOCK_K": 256, "SPLIT_K": 4,
                      "GATED": False, "PDL": False, "DEFER": False, "PUSH_WORLD": 0}, "bf16"),
    (g._gemv_kernel, {"M": 1, "W_SCALED": True, "EVEN_K": False, "BLOCK_N": 16,
                      "BLOCK_K": 512, "SPLIT_K": 1, "GATED": False, "DEFER": False,
                      "PUSH_WORLD": 0}, "bf16"),
    # a gated MLP's down projection, the activation folded into the load of x
    (g._gemv_kernel, {"M": 1, "W_SCALED": False, "HAS_BIAS": False, "EVEN_K": True,
                      "BLOCK_N": 32, "BLOCK_K": 256, "SPLIT_K": 7, "GATED": True,
                      "GELU": False, "DEFER": False, "PUSH_WORLD": 0}, "bf16"),
    # the same over float8 weights, its partial sums left to the norm after it
    (g._gemv_kernel, {"M": 1, "W_SCALED": True, "HAS_BIAS": False, "EVEN_K": True,
                      "BLOCK_N": 32, "BLOCK_K": 512, "SPLIT_K": 7, "GATED": True,
                      "GELU": False, "DEFER": True, "PUSH_WORLD": 0}, "bf16"),
    (g._gemv_kernel, {"M": 1, "W_SCALED": True, "HAS_BIAS": False, "EVEN_K": False,
                      "BLOCK_N": 32, "BLOCK_K": 512, "SPLIT_K": 1, "GATED": True,
                      "GELU": True, "DEFER": False, "PUSH_WORLD": 0}, "bf16"),
    # a row-parallel down projection at TP=2, its rows pushed to the peer as they are stored
    (g._gemv_kernel, {"M": 1, "W_SCALED": False, "HAS_BIAS": False, "EVEN_K": True,
                      "BLOCK_N": 32, "BLOCK_K": 256, "SPLIT_K": 7, "GATED": True,
                      "GELU": False, "DEFER": False, "PUSH_WORLD": 2}, "bf16"),
    (mg._gate_up_kernel, {"EVEN_K": True, "BLOCK_N": 16, "BLOCK_K": 256, "SPLIT_K": 2}, "bf16"),
    (mg._down_kernel, {"EVEN_K": True, "BLOCK_N": 32, "BLOCK_K": 256, "SPLIT_K": 4}, "bf16"),
    (da._split_kernel, {**DECODE, "GROUP": 8, "HEAD_DIM": 128, "BLOCK_D": 128}, "bf16"),
    (da._split_kernel, {**DECODE, "GROUP": 8, "HEAD_DIM": 256, "BLOCK_D": 256, "BLOCK_N": 32,
                        "SLIDING": True, "SOFTCAP": True}, "bf16"),
    # over an fp8 cache: bfloat16 queries, products in float16
    (da._split_kernel, {**DECODE, "GROUP": 4, "HEAD_DIM": 128, "BLOCK_D": 128, "KV_SCALED": True},
     ("bf16", {"k_cache_ptr": "*fp8e4nv", "v_cache_ptr": "*fp8e4nv"})),
    (da._merge_kernel, {"HEAD_DIM": 128, "BLOCK_D": 128, "BLOCK_S": 16}, "bf16"),
    (rn._rms_norm_kernel, {"HAS_RESIDUAL": True, "UNIT_OFFSET": False, "BLOCK": 4096,
                           "QUANTIZE": False, "ROUND_TO": "bf16", "X_SPLITS": 0}, "bf16"),
    # x a float8 GEMV's seven splits (`SplitSums`), added up as it loads
    (rn._rms_norm_kernel, {"HAS_RESIDUAL": True, "UNIT_OFFSET": False, "BLOCK": 4096,
                           "QUANTIZE": False, "ROUND_TO": "bf16", "X_SPLITS": 7,
                           "X_SCALED": True, "X_BIAS": False}, ("bf16", {"x_ptr": "*fp32"})),
    # ending in the per-token quantization of an FP8 linear layer's input
    (rn._rms_norm_kernel, {"HAS_RESIDUAL": True, "UNIT_OFFSET": False, "BLOCK": 4096,
                           "QUANTIZE": True, "ROUND_TO": "bf16", "X_SPLITS": 0},
     ("bf16", {"out_ptr": "*fp8e4nv"})),
    # rope + KV write: Mistral's heads into an fp8 cache; Phi's partial rotary; no rotary
    (rk._rope_kv_write_kernel, {**ROPE, "BLOCK_HQ": 32, "BLOCK_HKV": 8, "QUANTIZE": True},
     ("bf16", {"cos_sin_ptr": "*fp32", "k_cache_ptr": "*fp8e4nv", "v_cache_ptr": "*fp8e4nv"})),
    (rk._rope_kv_write_kernel, {**ROPE, "ROT_HALF": 16, "BLOCK_HALF": 16, "BLOCK_TAIL": 64},
     ("bf16", {"cos_sin_ptr": "*fp32"})),
    (rk._rope_kv_write_kernel, {**ROPE, "ROTATE": False}, ("bf16", {"cos_sin_ptr": "*fp32"})),
    (fq._act_and_mul_quantize_rows_kernel, {"GELU": False, "FP8_MAX": 448.0,
     "MIN_SCALE": 1e-12, "BLOCK": 16384}, ("bf16", {"q_ptr": "*fp8e4nv"})),
    # a decode step's inputs into a CUDA graph's buffers
    (si._step_inputs_kernel, {"BLOCK_W": 128},
     ("i64", {"tables_ptr": "*i32", "lens_ptr": "*i32"})),
]
results = []
for fn, given, dtype in CASES:
    consts = constexprs(fn, given)
    src = ASTSource(fn, signature(fn, consts, dtype), constexprs=consts)
    name = f"{fn.fn.__name__}{sorted(consts.items())}"
    try:
        triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4})
        results.append([name, "ok", ""])
    except CompilationError as exc:
        results.append([name, "code", str(exc)[-2000:]])
    except Exception as exc:
        results.append([name, "toolchain", f"{type(exc).__name__}: {str(exc)[-500:]}"])
print(json.dumps(results))
"""


def test_decode_kernels_compile_for_hopper():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=280
    )
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    code_errors = [r for r in results if r[1] == "code"]
    assert not code_errors, "\n\n".join(f"{name}:\n{err}" for name, _, err in code_errors)
    toolchain = [r for r in results if r[1] == "toolchain"]
    if toolchain:
        pytest.skip(f"no Hopper toolchain here: {toolchain[0][2]}")
    assert len(results) == 25 and all(r[1] == "ok" for r in results)

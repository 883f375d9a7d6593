"""Programmatic dependent launch (PDL, Hopper and later) for the decode kernels.

A batch-1 decode step is some 300 kernels in a row, most of them a few microseconds long:
each one's launch, its programs' ramp-up and the tail of the one before it are time the
weights are not streaming. With PDL a kernel may start while the one before it in the
stream is still running: its programs first load what no earlier kernel writes (a
projection's weights), then wait in `wait_prior` until the kernel before has finished and
its stores are visible, then do the rest. `release_next` lets the following kernel start
once every program of this one has reached it.

The rules every kernel launched with PDL keeps (otherwise it may read stale inputs or
overwrite a buffer an earlier kernel still reads):
- every program calls `wait_prior` before it reads anything a kernel of the step wrote and
  before its first store or atomic, with no early return before it (a kernel whose
  programs all skipped the wait could finish before the one before it, and the one after
  would then see that earlier kernel unfinished);
- only constant data and the step's inputs are read before the wait. Constant: projection
  and norm weights, rotary tables, an fp8 cache's scales, the peer all-reduce's address
  tables. The step's inputs (positions, cache slots, sequence lengths, block tables) are
  written by host copies, torch work and kernels/step_inputs.py (into the CUDA graph's
  buffers before it replays) before the step's forward starts, never by a kernel launched
  with PDL. The forward's first kernels (the embedding's, launched without PDL) start only
  once that work has ended and its stores are visible, and every kernel after them starts
  later still. (A
  kernel launched with PDL right after one launched without may see that one's stores
  only after its wait; no step input is written right before a kernel that reads it.)
  A buffer that a kernel launched with PDL may write is read after the wait, always.

Waiting is transitive: kernel C waits for B, which finished only after its own wait for
A. A kernel launched without PDL (torch's, cuBLAS's) runs after the one before it has
finished, as always, and a kernel after it starts early only once it has ended.

Launched with PDL: the decode GEMV, RMSNorm, rope + KV write, the split-K decode attention
and its merge, the one-shot peer all-reduces. Not (yet): the expert GEMVs (kernels/moe_gemv.py
says why), the grouped MoE GEMMs, the prefill attention, the FP8 GEMMs, torch's and
cuBLAS's kernels.

`MII_PDL=0` turns it off; it is on only on CUDA devices of compute capability 9 or more,
never under Triton's interpreter (which has no grid dependency control). CUDA graphs keep
the launches' programmatic edges when the step is captured.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


@functools.cache
def _capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def pdl_on(t: torch.Tensor) -> bool:
    """Whether kernels over t launch with PDL: CUDA of capability 9+, `MII_PDL` not 0, not
    interpreted."""
    if not t.is_cuda or os.environ.get("MII_PDL", "1") == "0":
        return False
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return False
    return _capable(t.device.index if t.device.index is not None else torch.cuda.current_device())


def pdl_args(t: torch.Tensor) -> dict:
    """A launch's keywords for kernels over t: the kernel's `PDL` constexpr, and with PDL
    on (`pdl_on`) the launch option too (the interpreter takes no such option)."""
    return {"PDL": True, "launch_pdl": True} if pdl_on(t) else {"PDL": False}


@triton.jit
def wait_prior(PDL: tl.constexpr):
    """Wait until the kernel before has finished and its stores are visible (PDL only)."""
    if PDL:
        tl.extra.cuda.gdc_wait()


@triton.jit
def release_next(PDL: tl.constexpr):
    """Let the next kernel in the stream start once every program has come here (PDL
    only)."""
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def enter(PDL: tl.constexpr):
    """A kernel's start when it prefetches nothing: the next kernel may start, then wait
    for the one before."""
    release_next(PDL)
    wait_prior(PDL)

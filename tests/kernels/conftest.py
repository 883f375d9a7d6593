"""Kernel fixtures: the Triton modules, interpreted on CPU-only machines, compiled on GPUs.

Triton chooses between compiling and interpreting when `@triton.jit` decorates a function
(its own library included), reading TRITON_INTERPRET at that moment, so the variable must
be set before anything imports triton, and it holds for the whole process. It is set here,
while pytest collects this folder, and only on machines without CUDA: there nothing else
runs Triton (the engine dispatches CPU tensors to the torch references), while on a GPU
machine the compiled kernels of this and other folders stay compiled.
"""

from __future__ import annotations

import importlib
import os
import sys
from types import SimpleNamespace

import pytest
import torch

KERNEL_MODULES = (
    "jit_math",
    "attention_tiles",
    "paged_attention",
    "decode_attention",
    "rope_kv_write",
    "rms_norm",
    "activation",
    "fp8_quant",
    "fp8_gemm",
    "step_inputs",
)

if not torch.cuda.is_available() and "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"


def _import_kernels() -> SimpleNamespace:
    return SimpleNamespace(
        **{m: importlib.import_module(f"mii.kernels.{m}") for m in KERNEL_MODULES}
    )


@pytest.fixture(scope="session")
def interpreted() -> SimpleNamespace:
    """The kernel modules running in Triton's interpreter on CPU tensors."""
    if torch.cuda.is_available():
        pytest.skip("interpreter tests run on CPU-only machines; the GPU tests cover these")
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton was imported before tests/kernels: run pytest tests/kernels")
    pytest.importorskip("triton")
    return _import_kernels()


@pytest.fixture(scope="session")
def compiled() -> SimpleNamespace:
    """The kernel modules as the engine imports them, compiled for the GPU."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    return _import_kernels()

"""Where does a family's greedy output on CUDA leave transformers'? Runs the engine in fp32
with the Triton kernels, eagerly, and with the torch references on the GPU, and prints the
first divergence per prompt for each (a debugging aid for the GPU parity tests)."""

from __future__ import annotations

import os
import sys
import tempfile

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tests"))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "tests", "engine"))
from test_gpu import hf_on_gpu, run_engine  # noqa: E402
from tiny_models import build_tiny_model, mixed_prompts  # noqa: E402


def first_diff(ours, ref):
    return [next((i for i, (a, b) in enumerate(zip(o, r, strict=True)) if a != b), len(r))
            for o, r in zip(ours, ref, strict=True)]  # fmt: skip


def main() -> None:
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    archs = sys.argv[1:] or ["gemma2", "phi3"]
    prompts = mixed_prompts(8, (1, 5, 17, 70, 33, 130, 2, 9), seed=5)
    for arch in archs:
        path = build_tiny_model(arch, tempfile.mkdtemp())
        ref = hf_on_gpu(path, prompts, 24)
        for label, env, eager in (
            ("triton+graphs", "0", False), ("triton eager", "0", True),
            ("torch-ref eager", "1", True),
        ):  # fmt: skip
            os.environ["MII_DISABLE_TRITON"] = env
            ours = run_engine(path, prompts, 24, eager=eager, budget=32)
            print(f"{arch:8s} {label:16s} first divergence {first_diff(ours, ref)}", flush=True)
        os.environ["MII_DISABLE_TRITON"] = "0"
        ours = run_engine(path, prompts, 24, eager=True, budget=4096)
        print(f"{arch:8s} {'triton 1 step':16s} first divergence {first_diff(ours, ref)}")


if __name__ == "__main__":
    main()

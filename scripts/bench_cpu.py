"""CPU throughput: mii.pipeline against transformers' generate in the same process.

SmolLM2-135M fp32, 32 prompts, 64 new tokens each (fixed length on both sides). The
baseline is one left-padded batch of all 32 prompts through `generate` (its fastest
setting here). Prints a table last; writes JSON with --json.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

import mii
from mii.engine.demo_model import ensure_demo_model

TOPICS = ["the ocean", "a robot", "coffee", "mountains", "jazz", "the moon", "bread", "chess"]
STYLES = [
    "Write a short story about",
    "Explain to a child",
    "List three facts about",
    "Describe in detail",
]


def prompts(n: int) -> list[str]:
    return [f"{STYLES[i % 4]} {TOPICS[i % 8]} (variant {i})." for i in range(n)]


def bench_hf(path: str, texts: list[str], new_tokens: int) -> tuple[float, int]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    batch = tok(texts, return_tensors="pt", padding=True)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            **batch,
            do_sample=False,
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            pad_token_id=tok.pad_token_id,
        )
    elapsed = time.perf_counter() - start
    return elapsed, (out.shape[1] - batch["input_ids"].shape[1]) * len(texts)


def bench_mii(path: str, texts: list[str], new_tokens: int) -> tuple[float, int]:
    pipe = mii.pipeline(path)
    pipe(texts[:2], max_new_tokens=2)  # warm-up
    start = time.perf_counter()
    out = pipe(texts, max_new_tokens=new_tokens, ignore_eos=True, do_sample=False)
    elapsed = time.perf_counter() - start
    return elapsed, sum(r.generated_length for r in out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    path = str(ensure_demo_model())
    texts = prompts(args.prompts)
    hf_s, hf_tokens = bench_hf(path, texts, args.new_tokens)
    mii_s, mii_tokens = bench_mii(path, texts, args.new_tokens)
    rows = {"hf_generate_padded": (hf_s, hf_tokens), "mii_pipeline": (mii_s, mii_tokens)}
    result = {k: {"seconds": s, "tokens": n, "tok_per_s": n / s} for k, (s, n) in rows.items()}
    result["ratio"] = (
        result["mii_pipeline"]["tok_per_s"] / result["hf_generate_padded"]["tok_per_s"]
    )
    result["threads"] = torch.get_num_threads()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    print(f"{'engine':<22}{'seconds':>9}{'tokens':>8}{'tok/s':>9}")
    for name, r in result.items():
        if isinstance(r, dict):
            print(f"{name:<22}{r['seconds']:>9.2f}{r['tokens']:>8}{r['tok_per_s']:>9.1f}")
    print(f"ratio mii / hf: {result['ratio']:.2f}x  (torch threads: {result['threads']})")


if __name__ == "__main__":
    main()

"""Mixture of experts in the engine: Mixtral-8x7B shape (random bf16 weights) as one TP=2
worker on two GPUs, against transformers on the same two GPUs, in one call:

- offline: --requests prompts of 512 random tokens generating 128 each (ignore_eos), output
  tok/s; transformers runs `generate` on static batches of --hf-batch over --hf-requests of
  the same prompts (it is slow: a subset gives its rate);
- batch 1: ms per output token (128-token prompt) against the floor: the bytes a decode
  step must read per GPU (every dense weight, the top-k experts of each layer, half of
  each on a rank) over the copy bandwidth measured in the same run.

transformers gets its layers split over the two GPUs in order, with the hidden states handed
on between them, as `device_map="auto"` places a model too big for one GPU (its weights are
drawn on the GPUs; a checkpoint this size cannot be written and read back in the time), and
runs its default experts implementation (recorded). Every measurement runs in its own
spawned process, so each starts on empty GPUs. Prints a table last; writes
bench_moe_engine_<preset>.json under $OUT when set.

    python scripts/bench_moe_engine.py          # needs 2 GPUs
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from bench_common import PRESETS, Timer, measure_peaks, preset_folder, warm_up, write_json
from bench_latency import bench_mii as bench_latency
from bench_offline import random_prompts
from bench_tp import VOCAB, build_engine, run_jobs

from mii.engine.models.moe import MoeSpec
from mii.engine.sampling_params import SamplingParams

DEVICES = (0, 1)


def active_weight_bytes(cfg, dtype_bytes: int = 2, matmul_bytes: int | None = None) -> int:
    """What a batch-1 decode step reads over all GPUs: attention, norms, routers and LM head
    weights, one embedding row, the top-k experts (and any shared expert) of each sparse
    layer, the MLP of each dense one."""
    spec = MoeSpec.of(cfg)
    hidden, heads = cfg.hidden_size, cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    kv = cfg.num_key_value_heads * head_dim
    attention = hidden * (heads * head_dim + 2 * kv) + heads * head_dim * hidden + 2 * hidden
    sparse = spec.top_k * 3 * hidden * spec.inner + spec.num_experts * hidden
    if spec.shared_inner:
        sparse += 3 * hidden * spec.shared_inner + hidden
    dense = 3 * hidden * cfg.intermediate_size
    layers = range(cfg.num_hidden_layers)
    mlps = sum(sparse if i in spec.sparse_layers else dense for i in layers)
    matmuls = len(layers) * attention + mlps  # norms and routers counted in: a rounding error
    return (
        matmuls * (matmul_bytes or dtype_bytes)
        + (cfg.vocab_size * hidden + 2 * hidden) * dtype_bytes
    )


# ---- transformers, layers split over the GPUs --------------------------------------------


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple | list):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj  # the KV cache object: its layers live where their tensors were made


def split_hf_model(preset: str, devices=DEVICES, device_type: str = "cuda"):
    """The preset's transformers model, random bf16 weights (normal, std 0.02) drawn on the
    GPU of each part: embeddings and the first half of the layers on the first GPU, the
    other half, the final norm and the LM head on the second; each part's inputs move to
    its GPU on the way in, the logits come back to the first."""
    import transformers

    cls_name, kwargs = PRESETS[preset]
    config = getattr(transformers, cls_name)(**kwargs)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    layers = model.model.layers
    per_gpu = -(-len(layers) // len(devices))
    parts = [(model.model.embed_tokens, devices[0])]
    parts += [(layer, devices[i // per_gpu]) for i, layer in enumerate(layers)]
    parts += [(model.model.norm, devices[-1]), (model.lm_head, devices[-1])]
    for module, index in parts:
        device = torch.device(device_type, index)
        module.to_empty(device=device)
        for p in module.parameters():
            p.data.normal_(0.0, 0.02)
        module.register_forward_pre_hook(
            lambda m, args, kw, d=device: (_to(args, d), _to(kw, d)), with_kwargs=True
        )
    first = torch.device(device_type, devices[0])
    with first:  # rotary tables are computed at init, which the meta device skipped
        model.model.rotary_emb = type(model.model.rotary_emb)(config)
    model.lm_head.register_forward_hook(lambda m, args, out: out.to(first))
    return model.eval()


def hf_job(args) -> dict:
    torch.cuda.set_device(DEVICES[0])
    peaks = measure_peaks()
    model = split_hf_model(args.preset)
    impl = getattr(model.config, "_experts_implementation", None)
    prompts = random_prompts(args.hf_requests, args.prompt_len_offline, VOCAB)
    latency_prompt = random_prompts(1, args.prompt_len, VOCAB, seed=1)[0]
    result = {"device": torch.cuda.get_device_name(), "experts_implementation": impl}
    result["ms_per_token"] = _hf_ms_per_token(model, latency_prompt, args.hf_new_tokens)
    result["offline"] = _hf_offline(model, prompts, args.new_tokens_offline, args.hf_batch)
    return {**result, "peaks": peaks}


def _generate(model, ids, new_tokens: int):
    return model.generate(
        ids, attention_mask=torch.ones_like(ids), do_sample=False,
        max_new_tokens=new_tokens, min_new_tokens=new_tokens,
    )  # fmt: skip


def _hf_ms_per_token(model, prompt, new_tokens: int) -> float:
    ids = torch.tensor([prompt], device="cuda")
    _generate(model, ids, 4)  # warm-up
    with Timer() as short:
        _generate(model, ids, 1)
    with Timer() as full:
        _generate(model, ids, new_tokens)
    return (full.seconds - short.seconds) / (new_tokens - 1) * 1e3


def _hf_offline(model, prompts, new_tokens: int, batch: int) -> dict:
    _generate(model, torch.tensor(prompts[:batch], device="cuda")[:, :16], 4)  # warm-up
    produced = 0
    with Timer() as t:
        for lo in range(0, len(prompts), batch):
            ids = torch.tensor(prompts[lo : lo + batch], device="cuda")
            out = _generate(model, ids, new_tokens)
            produced += (out.shape[1] - ids.shape[1]) * ids.shape[0]
    return {"requests": len(prompts), "output_tokens": produced, "seconds": t.seconds,
            "tok_per_s": produced / t.seconds}  # fmt: skip


# ---- the engine, one TP=2 group ----------------------------------------------------------


def engine_job(args, folder: str, peer_bytes: int | None = None) -> dict:
    """`peer_bytes`: all-reduces up to that size one-shot over peer memory (0: NCCL only;
    None: the engine's default, `peer_all_reduce.DEFAULT_MAX_BYTES`)."""
    if peer_bytes is not None:
        os.environ["MII_PEER_ALL_REDUCE_MAX_BYTES"] = str(peer_bytes)  # read as the model builds
    torch.cuda.set_device(DEVICES[0])
    peaks = measure_peaks()  # before the engine takes the memory
    engine = build_engine(folder, DEVICES, args.max_seqs, args.budget, args.sync, args.quantization)
    try:
        latency_prompt = random_prompts(1, args.prompt_len, VOCAB, seed=1)[0]
        result = {"latency": bench_latency(engine, latency_prompt, args.new_tokens),
                  "peaks": peaks, "peer_bytes": peer_bytes}  # fmt: skip
        if args.latency_only:
            return result
        prompts = random_prompts(args.requests, args.prompt_len_offline, VOCAB)
        result["offline"] = _engine_offline(engine, prompts, args.new_tokens_offline)
        return result
    finally:
        engine.close()


def _engine_offline(engine, prompts, new_tokens: int) -> dict:
    warm_up(engine, prompts, new_tokens)
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(str(i), p, params)
    produced, start = 0, time.perf_counter()
    while engine.has_unfinished_requests():
        produced += sum(len(o.token_ids) for o in engine.step())
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"requests": len(prompts), "output_tokens": produced, "seconds": seconds,
            "tok_per_s": produced / seconds}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--preset", default="mixtral-8x7b")
    ap.add_argument("--requests", type=int, default=512)
    ap.add_argument("--prompt-len-offline", type=int, default=512)
    ap.add_argument("--new-tokens-offline", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=128, help="the batch-1 prompt")
    ap.add_argument("--new-tokens", type=int, default=256, help="batch-1 tokens")
    ap.add_argument("--hf-requests", type=int, default=128)
    ap.add_argument("--hf-batch", type=int, default=64)
    ap.add_argument("--hf-new-tokens", type=int, default=32, help="transformers' batch 1")
    ap.add_argument("--max-seqs", type=int, default=256)
    ap.add_argument("--budget", type=int, default=4096)
    ap.add_argument("--skip-hf", action="store_true")
    ap.add_argument("--latency-only", action="store_true", help="batch 1 only, no transformers")
    ap.add_argument("--peer-bytes", type=int, default=None,
                    help="all-reduces up to this size one-shot over peer memory (0: NCCL; "
                    "default: the engine's, 512 KB); with --latency-only and a size, batch 1 "
                    "runs with NCCL too")  # fmt: skip
    ap.add_argument("--sync", action="store_true", help="no asynchronous scheduling")
    ap.add_argument("--quantization", choices=["fp8"], default=None,
                    help="FP8 attention and experts (the floor counts them at a byte)")  # fmt: skip
    args = ap.parse_args()
    if torch.cuda.device_count() < 2:  # counts through NVML: this process stays off the GPUs
        raise SystemExit("bench_moe_engine needs two visible GPUs")

    import transformers

    cls_name, kwargs = PRESETS[args.preset]
    hf_config = getattr(transformers, cls_name)(**kwargs)
    folder = preset_folder(args.preset)
    if args.latency_only:
        args.skip_hf = True
    hf = None if args.skip_hf else run_jobs([(hf_job, (args,))])[0]
    ours = run_jobs([(engine_job, (args, folder, args.peer_bytes))])[0]
    result = {"args": vars(args), "torch": torch.__version__, "hf": hf, "mii_tp2": ours}
    if args.latency_only and args.peer_bytes:
        result["mii_tp2_nccl"] = run_jobs([(engine_job, (args, folder, 0))])[0]
    copy = (hf or ours)["peaks"]["copy_bytes_per_s"]
    matmul_bytes = 1 if args.quantization else None
    floor_bytes = active_weight_bytes(hf_config, 2, matmul_bytes)
    result["floor_ms"] = floor_bytes / len(DEVICES) / copy * 1e3
    result["ratio_to_floor"] = ours["latency"]["ms_per_token"] / result["floor_ms"]
    if hf is not None:
        result["offline_ratio"] = ours["offline"]["tok_per_s"] / hf["offline"]["tok_per_s"]
    write_json(f"bench_moe_engine_{args.preset}.json", result)
    print_table(result)


def print_table(r: dict) -> None:
    a, hf, ours = r["args"], r["hf"], r["mii_tp2"]
    device = hf["device"] if hf else "GPU"
    weights = "FP8 (experts, attention)" if a.get("quantization") else "bf16"
    print(f"\n{device} x2  {a['preset']}  {weights} random weights, TP=2")
    print(f"{'offline ' + str(a['prompt_len_offline']) + '/' + str(a['new_tokens_offline']):<34}"
          f"{'requests':>10}{'seconds':>10}{'tok/s':>10}")  # fmt: skip
    rows = [("mii TP=2", ours["offline"])] if "offline" in ours else []
    if hf:
        rows.append((f"transformers split ({hf['experts_implementation']})", hf["offline"]))
    for name, o in rows:
        print(f"{name:<34}{o['requests']:>10}{o['seconds']:>10.2f}{o['tok_per_s']:>10.0f}")
    print(f"{'batch 1, ' + str(a['prompt_len']) + ' in':<34}{'ms/token':>10}{'TTFT ms':>10}")
    peer = ours["peer_bytes"]
    label = ", NCCL" if peer == 0 else f", one-shot peer{' (default)' if peer is None else ''}"
    runs = [(f"mii TP=2{label}", ours)]
    if "mii_tp2_nccl" in r:
        runs.append(("mii TP=2, NCCL", r["mii_tp2_nccl"]))
    for name, run in runs:
        lat = run["latency"]
        print(f"{name:<34}{lat['ms_per_token']:>10.2f}{lat['ttft_ms']:>10.1f}")
    if hf:
        print(f"{'transformers split':<34}{hf['ms_per_token']:>10.2f}")
        print(f"offline mii / transformers = {r['offline_ratio']:.2f}x (target >= 4x)")
    print(
        f"{'floor (active weights / 2 GPUs)':<34}{r['floor_ms']:>10.2f}  "
        f"(copy {(hf or ours)['peaks']['copy_bytes_per_s'] / 1e9:.0f} GB/s)"
    )
    print(f"batch 1 = {r['ratio_to_floor']:.2f}x the floor (target <= 1.4x)")


if __name__ == "__main__":
    main()

"""Shared pieces of the GPU benchmarks: model presets with random weights, peak rates
measured in the same run, and roofline accounting of the steps an engine ran."""

from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, field

import torch

PRESETS = {
    "mistral-7b": (
        "MistralConfig",
        dict(
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=32000,
            max_position_embeddings=32768,
            rope_theta=1e6,
            sliding_window=None,
        ),
    ),
    "llama-2-7b": (
        "LlamaConfig",
        dict(
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            vocab_size=32000,
            max_position_embeddings=4096,
        ),
    ),
    "llama-2-70b": (
        "LlamaConfig",
        dict(
            hidden_size=8192,
            intermediate_size=28672,
            num_hidden_layers=80,
            num_attention_heads=64,
            num_key_value_heads=8,
            vocab_size=32000,
            max_position_embeddings=4096,
            rms_norm_eps=1e-5,
        ),
    ),
    "llama-3-8b": (
        "LlamaConfig",
        dict(
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=128256,
            max_position_embeddings=8192,
            rope_theta=500000.0,
        ),
    ),
    "qwen2-7b": (
        "Qwen2Config",
        dict(
            hidden_size=3584,
            intermediate_size=18944,
            num_hidden_layers=28,
            num_attention_heads=28,
            num_key_value_heads=4,
            vocab_size=152064,
            max_position_embeddings=32768,
            rope_theta=1e6,
        ),
    ),
    "mistral-7b-v0.1": (  # sliding-window attention over 4096 keys, 32k positions
        "MistralConfig",
        dict(
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=32000,
            max_position_embeddings=32768,
            rope_theta=10000.0,
            sliding_window=4096,
        ),
    ),
    "gemma-2-9b": (  # head_dim 256, soft-capping, local (4096) and global layers alternate
        "Gemma2Config",
        dict(
            hidden_size=3584,
            intermediate_size=14336,
            num_hidden_layers=42,
            num_attention_heads=16,
            num_key_value_heads=8,
            head_dim=256,
            vocab_size=256000,
            max_position_embeddings=8192,
            query_pre_attn_scalar=256,
            sliding_window=4096,
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
        ),
    ),
    "phi-3-mini": (  # Phi-3-mini-4k: fused qkv and gate_up, a 2047-key window
        "Phi3Config",
        dict(
            hidden_size=3072,
            intermediate_size=8192,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            vocab_size=32064,
            max_position_embeddings=4096,
            original_max_position_embeddings=4096,
            sliding_window=2047,
            pad_token_id=32000,
        ),
    ),
    "qwen3-8b": (  # q/k norms, head_dim 128
        "Qwen3Config",
        dict(
            hidden_size=4096,
            intermediate_size=12288,
            num_hidden_layers=36,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=128,
            vocab_size=151936,
            max_position_embeddings=40960,
            rope_theta=1e6,
            tie_word_embeddings=False,
        ),
    ),
    "mixtral-8x7b": (  # 8 experts of intermediate 14336, top-2; 46.7B parameters, 12.9B active
        "MixtralConfig",
        dict(
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            num_local_experts=8,
            num_experts_per_tok=2,
            vocab_size=32000,
            max_position_embeddings=32768,
            rope_theta=1e6,
            sliding_window=None,
        ),
    ),
    "qwen1.5-moe-a2.7b": (  # 60 experts of 1408, top-4 unnormalised, a shared expert of 5632
        "Qwen2MoeConfig",
        dict(
            hidden_size=2048,
            intermediate_size=5632,
            moe_intermediate_size=1408,
            shared_expert_intermediate_size=5632,
            num_hidden_layers=24,
            num_attention_heads=16,
            num_key_value_heads=16,
            num_experts=60,
            num_experts_per_tok=4,
            norm_topk_prob=False,
            vocab_size=151936,
            max_position_embeddings=8192,
            rope_theta=1e6,
        ),
    ),
    "opt-6.7b": (
        "OPTConfig",
        dict(
            hidden_size=4096,
            ffn_dim=16384,
            num_hidden_layers=32,
            num_attention_heads=32,
            vocab_size=50272,
            max_position_embeddings=2048,
            word_embed_proj_dim=4096,
        ),
    ),
}


def preset_folder(name: str, **overrides) -> str:
    """A folder holding only the preset's config.json (weights are drawn at load);
    `overrides` replace config fields (a sliding window, say)."""
    import transformers

    cls_name, kwargs = PRESETS[name]
    config = getattr(transformers, cls_name)(**{**kwargs, **overrides}, torch_dtype="bfloat16")
    folder = tempfile.mkdtemp(prefix=f"mii-{name}-")
    config.save_pretrained(folder)
    return folder


def hf_model(name: str, device: str = "cuda", **overrides):
    """transformers' model of the preset, random bf16 weights drawn on the device."""
    import transformers

    cls_name, kwargs = PRESETS[name]
    config = getattr(transformers, cls_name)(**{**kwargs, **overrides})
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return model.eval()


def copy_bandwidth() -> float:
    """Device copy bytes/s of 1 GiB (read + write): the bandwidth every floor divides by."""
    import triton.testing

    src = torch.randn(1 << 29, device="cuda", dtype=torch.bfloat16)  # 1 GiB
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def fp8_matmul_flops() -> float:
    """float8 e4m3 matmul FLOP/s: 8192^3 through `torch._scaled_mm` with row-wise scales and
    a bf16 output, as the FP8 linear layers call it (kernels/fp8_gemm.scaled_mm_rows)."""
    import triton.testing

    a, b = (torch.randn(8192, 8192, device="cuda").to(torch.float8_e4m3fn) for _ in "ab")
    scale_a = torch.ones(8192, 1, device="cuda")
    scale_b = torch.ones(1, 8192, device="cuda")

    def matmul():
        return torch._scaled_mm(a, b.t(), scale_a=scale_a, scale_b=scale_b,
                                out_dtype=torch.bfloat16)  # fmt: skip

    ms = triton.testing.do_bench(matmul, warmup=50, rep=300, return_mode="median")
    return 2 * 8192**3 / (ms * 1e-3)


def measure_peaks() -> dict[str, float]:
    """bf16 matmul FLOP/s (8192^3) and `copy_bandwidth`."""
    import triton.testing

    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    ms = triton.testing.do_bench(lambda: a @ b, warmup=50, rep=300, return_mode="median")
    peaks = {"matmul_flops": 2 * 8192**3 / (ms * 1e-3), "copy_bytes_per_s": copy_bandwidth()}
    torch.cuda.empty_cache()
    return peaks


@dataclass
class ModelShape:
    matmul_params: int  # parameters in matmuls per token (incl. the LM head)
    weight_bytes: int
    layers: int
    q_heads: int
    kv_heads: int
    head_dim: int
    dtype_bytes: int = 2

    @staticmethod
    def of(model: torch.nn.Module, hf_config) -> ModelShape:
        embed = 0
        for name, p in model.named_parameters():
            if "embed_tokens" in name or "embed_positions" in name:
                embed += p.numel()
        total = sum(p.numel() for p in model.parameters())
        tied = getattr(model, "tie_word_embeddings", False)
        head = hf_config.vocab_size * (
            getattr(hf_config, "word_embed_proj_dim", None) or hf_config.hidden_size
        )
        heads = hf_config.num_attention_heads
        return ModelShape(
            matmul_params=total - embed + (head if tied else 0),
            weight_bytes=sum(p.numel() * p.element_size() for p in model.parameters()),
            layers=hf_config.num_hidden_layers,
            q_heads=heads,
            kv_heads=getattr(hf_config, "num_key_value_heads", None) or heads,
            head_dim=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads,
        )


@dataclass
class Roofline:
    """Sums each step's floor: max(FLOPs / peak FLOP/s, bytes / peak bytes/s), the linear
    layers' FLOPs at `linear_flops_per_s` when given (FP8 weights: the float8 matmul rate;
    the LM head, 2% of a 7B model's, counted there too) and attention's at the bf16 rate."""

    shape: ModelShape
    peaks: dict[str, float]
    linear_flops_per_s: float | None = None
    floor_s: float = 0.0
    steps: int = 0
    tokens: int = 0
    detail: list = field(default_factory=list)
    timeline: list = field(default_factory=list)
    """Per step: (tokens, decodes, floor s, start event, end event); see `step_table`."""

    def record(self, chunks) -> None:
        s = self.shape
        kv_token_bytes = 2 * s.layers * s.kv_heads * s.head_dim * s.dtype_bytes
        tokens = sum(c.num_tokens for c in chunks)
        sampled = sum(1 for c in chunks if c.samples)
        attn_pairs = sum(
            c.num_tokens * c.start + c.num_tokens * (c.num_tokens + 1) // 2 for c in chunks
        )
        linear = 2 * s.matmul_params * tokens
        attention = 4 * s.layers * s.q_heads * s.head_dim * attn_pairs
        kv_read = sum(c.end for c in chunks) * kv_token_bytes
        moved = s.weight_bytes + kv_read + tokens * kv_token_bytes
        del sampled
        bf16 = self.peaks["matmul_flops"]
        compute_s = linear / (self.linear_flops_per_s or bf16) + attention / bf16
        floor = max(compute_s, moved / self.peaks["copy_bytes_per_s"])
        self.floor_s += floor
        self.steps += 1
        self.tokens += tokens
        decodes = sum(1 for c in chunks if c.num_tokens == 1 and c.samples)
        self.timeline.append([tokens, decodes, floor])

    def step_table(self) -> list[dict]:
        """The steps by kind (decode-only, or prompt chunks beside decodes, by tokens): how
        many, their device time between the events around each step's launch (idle time
        inside a step included), and their floor."""
        rows: dict[str, dict] = {}
        for tokens, decodes, floor, start, end in self.timeline:
            if tokens == decodes:
                kind = "decode only"
            else:
                kind = f"with prompts, up to {1 << (tokens - 1).bit_length():>5} tokens"
            row = rows.setdefault(
                kind, dict(kind=kind, steps=0, tokens=0, decodes=0, device_ms=0.0, floor_ms=0.0)
            )
            row["steps"] += 1
            row["tokens"] += tokens
            row["decodes"] += decodes
            row["device_ms"] += start.elapsed_time(end)
            row["floor_ms"] += floor * 1e3
        return sorted(rows.values(), key=lambda r: r["kind"])


def warm_up(engine, prompts: list[list[int]], new_tokens: int) -> None:
    """Run the whole offline workload once, untimed, before the timed run: the scheduler
    is deterministic, so the timed run meets exactly the step shapes (and the Triton tile
    choices and argument alignments) that compiled here. A partial warm-up left compiles
    inside the timed window: 8 short requests, FP8 4,925-6,825 tok/s against 9,000 once
    cached; a quarter of the workload, still a 1,324-token tail step of 565 ms and 9,630
    against 10,962-10,990 (first runs on fresh H100 machines)."""
    from mii.engine.sampling_params import SamplingParams

    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    for i, p in enumerate(prompts):
        engine.add_request(f"warm{i}", p, params)
    while engine.has_unfinished_requests():
        engine.step()


def attach_roofline(engine, roofline: Roofline) -> None:
    """Record every step the engine's model runner executes."""
    run = engine.runner.run

    def recorded(chunks, *args):
        roofline.record(chunks)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = run(chunks, *args)
        end.record()
        roofline.timeline[-1] += [start, end]
        return out

    engine.runner.run = recorded


def switches() -> dict[str, str]:
    """The kernel switches set in the environment (`MII_*`, docs/performance.md's table)."""
    return {k: v for k, v in sorted(os.environ.items()) if k.startswith("MII_")}


def write_json(name: str, payload: dict) -> None:
    """payload, with the switches it ran under, as OUT/name (else ./name)."""
    out = os.environ.get("OUT")
    path = os.path.join(out, name) if out else name
    with open(path, "w") as f:
        json.dump({**payload, "switches": switches()}, f, indent=2, default=str)


def write_text(name: str, text: str) -> None:
    out = os.environ.get("OUT")
    with open(os.path.join(out, name) if out else name, "w") as f:
        f.write(text)


class Timer:
    def __enter__(self):
        torch.cuda.synchronize()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.start


def graph_timed(fn, per_graph: int = 50, replays: int = 20, before_timing=None) -> float:
    """Microseconds per call of fn(i) (i = the call's index in the graph), `per_graph`
    calls captured in one CUDA graph, replayed `replays` times; `before_timing()` runs just
    before the timed replays (a barrier across ranks)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(3):
            fn(i)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(per_graph):
            fn(i)
    graph.replay()
    torch.cuda.synchronize()
    if before_timing is not None:
        before_timing()
    return replay_ms(graph, replays) * 1000 / per_graph


def replay_ms(graph, replays: int) -> float:
    """Milliseconds per replay of a captured CUDA graph, `replays` back to back."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / replays

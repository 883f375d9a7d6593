"""Engine configuration: frozen dataclasses, derived values as cached properties."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from functools import cached_property
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

# torch is imported where a dtype or a device is needed, not here: `mii.config` (which a
# client host imports) builds on these dataclasses, and a client host needs no torch.
_DTYPES = {
    "float32": "float32",
    "fp32": "float32",
    "float": "float32",
    "float16": "float16",
    "fp16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}


KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")
"""'auto': the model's dtype; 'fp8' (= 'fp8_e4m3'): float8 e4m3 with per-head scales."""


class SchedulePolicy(str, Enum):
    SPLITFUSE = "splitfuse"  # decodes first, then prompt chunks, up to the token budget
    PREFILL_FIRST = "prefill_first"  # waiting prompts before any decode (for comparison)


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    import torch

    if isinstance(name, torch.dtype):
        return name
    key = name.removeprefix("torch.").lower()
    if key not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(_DTYPES)}")
    return getattr(torch, _DTYPES[key])


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    num_blocks: int | None = None
    """Number of KV blocks; None sizes the cache from the memory options below."""
    gpu_memory_utilization: float = 0.9
    """Fraction of the GPU's memory the engine may use in all (weights, activations, cache)."""
    cpu_kv_cache_gib: float = 1.0
    """KV cache size on the CPU."""
    enable_prefix_caching: bool = True
    kv_cache_dtype: str = "auto"
    """'auto': the model's dtype; 'fp8' or 'fp8_e4m3': one byte an element, scaled per
    layer and KV head (engine/kv_cache.py), twice the blocks of a 16-bit cache."""

    def __post_init__(self) -> None:
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(
                f"unknown kv_cache_dtype {self.kv_cache_dtype!r}; use one of "
                + ", ".join(repr(d) for d in KV_CACHE_DTYPES)
            )


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int = 512
    """Token budget of one forward pass (Dynamic SplitFuse)."""
    max_num_seqs: int = 512
    """As DeepSpeed-MII's max_ragged_sequence_count. Offline on an H100 (bench_offline.py,
    Mistral-7B shape, 1000 x 512/128) 512 sequences against 256 ran FP8 10,962 against 10,480
    tok/s and bf16 7,037 against 6,662: fewer decode-only steps, each with more rows."""
    policy: SchedulePolicy = SchedulePolicy.SPLITFUSE


@dataclass(frozen=True)
class EngineConfig:
    model: str
    """A local Hugging Face model folder, a Hub name (`org/model`) or a short name."""
    revision: str | None = None
    """The Hub revision (branch, tag or commit) of a Hub model; None: its default branch."""
    tokenizer: str | None = None
    dtype: str = "auto"
    """'auto' takes the checkpoint's dtype on the GPU and float32 on the CPU."""
    device: str = "auto"
    max_model_len: int | None = None
    tensor_parallel: int = 1
    device_ids: tuple[int, ...] | None = None
    """CUDA devices of the tensor-parallel ranks in rank order, as indices among the visible
    devices; None: `tensor_parallel` consecutive devices from `device`'s index (0)."""
    enforce_eager: bool = False
    """Skip CUDA graphs for decode-only steps."""
    async_scheduling: bool | None = None
    """Schedule and launch step N+1 before reading step N's samples back (its decodes take
    their input tokens from the device), so the host's work overlaps the GPU's. None: on
    for CUDA. Requests with a repetition penalty run synchronously (it needs every token
    on the host)."""
    load_format: str = "auto"
    """'auto': the folder's weights; 'dummy': random weights of the folder's config, drawn on
    the device (benchmarks of a model's shape without its checkpoint, as vLLM's option)."""
    skip_tokenizer_init: bool = False
    """Run without a tokenizer: prompts are token ids and outputs carry ids, no text."""
    warm_up: bool | None = None
    """Run throwaway requests through the engine once it is built (`LLMEngine.warm_up`), so
    that the Triton kernels of the step shapes serving meets first compile then, not while
    the first clients wait. None: on for CUDA (the CPU compiles nothing)."""
    quantization: str | None = None
    """'fp8': linear weights in float8 e4m3 with per-output-channel scales, quantized at
    load (engine/quantization.py). None: as the checkpoint stores them (an FP8 checkpoint,
    a `quantization_config` of method fp8 or compressed-tensors' float8, loads as FP8)."""
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    def __post_init__(self) -> None:
        if self.load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format is 'auto' or 'dummy', not {self.load_format!r}")
        if self.quantization not in (None, "fp8"):
            raise ValueError(f"quantization is 'fp8' or None, not {self.quantization!r}")

    @cached_property
    def torch_device(self) -> torch.device:
        import torch

        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

"""The paged KV cache's element type, and the scales of an fp8 cache.

`kv_cache_dtype="fp8"` (or "fp8_e4m3") stores keys and values in float8 e4m3: one byte an
element, so the same memory holds twice the blocks of a bf16 cache. An element is
`x / scale` rounded to nearest and clamped to +-448, with one fp32 scale per layer and KV
head (the contract is in kernels/torch_ref.py; the attention kernels fold the K scale into
the score scale and the V scale into the output).

Where the scales come from. e4m3 is a float format: any value between 2^-6 and 448 times
its scale keeps three mantissa bits, so a scale has only to keep a head's values inside
that range, not to fit them tightly. A fixed scale of 1.0 (vLLM's default without scales
in the checkpoint) overflows on heads whose values pass 448 (random weights; outlier
heads of real models) and spends range on tiny ones. Scales taken from the first prefill
depend on what one request says, and can never grow once blocks hold values written with
them. So the engine calibrates once at start-up, before it allocates the cache: a forward
pass of CALIBRATION_TOKENS seeded random tokens (the same on every tensor-parallel rank)
over a scratch cache in the model's dtype gives each head's largest |k| (after rotary)
and |v|, and the head's scale is that times HEADROOM / 448. The headroom lets later values
up to HEADROOM times larger than any seen in calibration (other text, other positions'
rotations, outlier tokens) through unclipped, at the cost of two of e4m3's eighteen
binades, at the bottom, where values 10^4 times below the head's largest land. Larger
ones are clamped: never inf or NaN. A head that calibration saw only as zeros gets 1.0.
The scales never change afterwards, so a block reused through prefix caching reads back
the same in every sequence, and CUDA graphs read them where they were captured.

A checkpoint published with KV-cache scales (llm-compressor / AutoFP8 "FP8-KV" releases:
`self_attn.k_scale` and `v_scale`, the older single `kv_scale`, or `k_proj.output_scale`
and `v_proj.output_scale`; one scalar per layer, calibrated on real text) gives its own,
as vLLM uses them: every head of a layer takes the layer's scale, and nothing is calibrated.
Only a set that covers every layer is used; another is reported and calibration runs.
"""

from __future__ import annotations

import logging
import re

import torch
from torch import nn

from mii.engine.layers.attention import AttentionMetadata, PagedAttention
from mii.kernels.torch_ref import FP8_DTYPE, FP8_MAX

logger = logging.getLogger(__name__)

FP8_NAMES = ("fp8", "fp8_e4m3")
CHECKPOINT_SCALE = re.compile(
    r"\.layers\.(\d+)\.[a-z_]+\."
    r"(?:attn\.(?=[kv]_scale$))?(?:(k|v|kv)_scale|(k|v)_proj\.output_scale)$"
)
"""A KV-cache scale's name in a checkpoint: layer index, then k / v / kv as the scale's own
name or its projection's says (`...self_attn.k_scale`, `...self_attn.attn.v_scale`,
`...self_attn.kv_scale`, `...self_attn.k_proj.output_scale`)."""
CALIBRATION_TOKENS = 256
HEADROOM = 4.0
CALIBRATION_SEED = 0


def cache_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The cache's element type for `CacheConfig.kv_cache_dtype` ('auto': the model's)."""
    return FP8_DTYPE if kv_cache_dtype in FP8_NAMES else model_dtype


def scales_from_absmax(absmax: torch.Tensor) -> torch.Tensor:
    """Scales (fp32) for heads whose largest calibrated magnitude is `absmax`."""
    scale = absmax.float() * (HEADROOM / FP8_MAX)
    usable = (scale > 0) & scale.isfinite()
    return torch.where(usable, scale, torch.ones_like(scale))


@torch.inference_mode()
def calibrate_scales(
    model: nn.Module,
    layers: list[PagedAttention],
    vocab_size: int,
    max_tokens: int,
    block_size: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """(2, layers, Hkv) fp32: the K and V scales of each layer's heads (see above), from
    CALIBRATION_TOKENS tokens or `max_tokens` if fewer (the token budget, whose activations
    the memory plan allows for; the rotary table's length). Binds every layer to a scratch
    cache: the caller binds the real one afterwards."""
    tokens = min(CALIBRATION_TOKENS, max_tokens)
    blocks = -(-tokens // block_size)
    heads, dim = layers[0].num_kv_heads, layers[0].head_dim
    device = next(model.parameters()).device
    # (K/V, layer, blocks, block_size, Hkv, D): zeros where no token lands
    scratch = torch.zeros((2, len(layers), blocks, block_size, heads, dim), dtype=dtype,
                          device=device)  # fmt: skip
    for i, attn in enumerate(layers):
        attn.bind_cache(scratch[0, i], scratch[1, i])
    generator = torch.Generator().manual_seed(CALIBRATION_SEED)
    ids = torch.randint(vocab_size, (tokens,), generator=generator).to(device)
    positions = torch.arange(tokens, device=device)
    model(ids, positions, AttentionMetadata.one_sequence(tokens, block_size, device))
    absmax = scratch.abs().amax(dim=(2, 3, 5))  # (2, layers, Hkv)
    return scales_from_absmax(absmax)


def scales_from_checkpoint(weights, num_layers: int, kv_heads: int) -> torch.Tensor | None:
    """(2, layers, Hkv) fp32 from a checkpoint's (name, tensor) pairs (those an FP8
    checkpoint's pass in engine/quantization.py kept), each layer's scalar K and V scale
    over all its heads; None where the checkpoint has
    none, or not one K and one V scalar for every layer (reported: the caller calibrates)."""
    found: dict[tuple[int, int], float] = {}
    for name, tensor in weights:
        match = CHECKPOINT_SCALE.search(name)
        if match is None:
            continue
        value = tensor[...].float().reshape(-1)
        if value.numel() != 1:
            logger.warning("KV-cache scale %s holds %d values, not one per layer: the engine "
                           "calibrates its own scales", name, value.numel())  # fmt: skip
            return None
        layer, kind = int(match.group(1)), match.group(2) or match.group(3)
        for kv in (0, 1) if kind == "kv" else ("kv".index(kind),):
            found[(kv, layer)] = value.item()
    if not found:
        return None
    wanted = {(kv, layer) for kv in (0, 1) for layer in range(num_layers)}
    if set(found) != wanted or not all(v > 0 and v < float("inf") for v in found.values()):
        logger.warning("the checkpoint's KV-cache scales cover %d of %d (K or V, layer) pairs "
                       "or are not positive: the engine calibrates its own scales",
                       len(set(found) & wanted), len(wanted))  # fmt: skip
        return None
    scales = torch.tensor([[found[(kv, layer)] for layer in range(num_layers)] for kv in (0, 1)])
    return scales[:, :, None].expand(2, num_layers, kv_heads).contiguous()

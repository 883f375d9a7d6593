"""Which linear layers of a model hold FP8 weights, and how the checkpoint's tensors reach
them (the layers' method is layers/fp8_linear.py).

- `quantization="fp8"` over an unquantized checkpoint: every tensor-parallel linear layer
  (attention and MLP projections) is quantized once its weights are loaded. Embeddings, the
  LM head and replicated layers (MoE routers: small, and routing is sensitive) stay as they
  are; MoE experts as the last point says. Under tensor parallelism each rank quantizes
  its own shard: a row-parallel layer's scales then cover each rank's slice of the input
  features (finer than one process's, so results differ slightly from tensor_parallel=1).
- An FP8 checkpoint (config.json's `quantization_config`: `quant_method: "fp8"` as
  AutoFP8 / llm-compressor publish for Llama-3 and Mistral, or `"compressed-tensors"` with
  float8 weights) loads as FP8 whatever `quantization` says: each layer that the checkpoint
  gives a `weight_scale` takes its float8 weight as stored. Per-tensor scales become one
  scale per row (fused q/k/v keep each part's own), per-channel ones ([N] or [N, 1]) load
  as they are. Static `input_scale`s are not used: activations are scaled per token at
  run time, which is at least as accurate.
- MoE experts (layers/moe.py) on CUDA: in float8 too, with one scale per expert and output
  row, as an FP8 checkpoint stores them (Mixtral's `experts.{e}.w1` ... with their
  `weight_scale`s) or quantized row by row as they load. On the CPU they stay in the
  model's dtype, an FP8 checkpoint's dequantized as they load.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mii.engine import kv_cache
from mii.engine.layers.fp8_linear import Dequantized, Fp8LinearMethod
from mii.engine.layers.linear import LinearBase, ReplicatedLinear
from mii.engine.layers.moe import ExpertStack, FusedExperts
from mii.engine.loader import iterate_checkpoint, parameter_of

SCALE = ".weight_scale"
UNUSED = (".input_scale", ".k_scale", ".v_scale", ".kv_scale", ".output_scale")
"""FP8 checkpoints' static activation and KV-cache scales (AutoFP8's and compressed-
tensors' names for them), which no layer loads: activations are scaled per token, and an
FP8 KV cache reads its scales from the checkpoint itself (engine/kv_cache.py)."""


@dataclass(frozen=True)
class Quantization:
    """FP8 for some linear layers of a model (`plan_quantization` says which)."""

    checkpoint_layers: frozenset[str] | None
    """The layers whose float8 weights the checkpoint holds; None: quantize at load."""
    scale_rows: dict[str, int] | None = None
    """Rows of each checkpoint weight that a `weight_scale` scales (per-tensor scales)."""
    expert_scales: dict[str, torch.Tensor] | None = None
    """The `weight_scale` of each float8 expert weight of the checkpoint, by the scale's
    name (float32, flat): those weights load dequantized."""
    kv_scales: dict[str, torch.Tensor] | None = None
    """The checkpoint's KV-cache scales by name (`kv_cache.CHECKPOINT_SCALE`), read in the
    same pass: an fp8 cache takes them (`kv_cache.scales_from_checkpoint`)."""

    def prepare(self, model: nn.Module, device: torch.device) -> None:
        """Give the layers their FP8 method before the checkpoint loads (`device`: where
        the model runs; its parameters may still be on the meta device)."""
        _check_device(device)
        for layer in self._layers(model):
            layer.method = Fp8LinearMethod(from_checkpoint=self.checkpoint_layers is not None)
            layer.method.prepare(layer)
        for experts in _gpu_experts(model, device):
            experts.store_fp8()

    def weights(self, path: str) -> Iterator[tuple[str, Any]]:
        """The checkpoint's tensors as the layers take them: scales as float32 vectors over
        the weight's rows, unused scales left out."""
        experts = self.expert_scales or {}
        for name, tensor in iterate_checkpoint(path):
            if name.endswith(UNUSED) or name in experts:
                continue
            expert_scale = experts.get(name.removesuffix(".weight") + SCALE)
            if expert_scale is not None:
                tensor = Dequantized(tensor, expert_scale)
            elif name.endswith(SCALE) and self.scale_rows is not None:
                tensor = _scale_rows(tensor[...], self.scale_rows[name])
            yield name, tensor

    def finish(self, model: nn.Module) -> None:
        """Quantize what loaded unquantized."""
        for layer in self._layers(model):
            layer.method.process_after_loading(layer)

    def _layers(self, model: nn.Module) -> Iterator[LinearBase]:
        for name, module in model.named_modules():
            if not isinstance(module, LinearBase):
                continue
            if self.checkpoint_layers is None:
                if not isinstance(module, ReplicatedLinear):
                    yield module
            elif name in self.checkpoint_layers:
                yield module


def plan_quantization(
    requested: str | None, hf_config: Any, model: nn.Module, path: str | None
) -> Quantization | None:
    """The model's FP8 layers: the checkpoint's (`path`; None for random weights, which
    are quantized like any unquantized checkpoint), else every parallel linear layer when
    `requested == "fp8"`, else none (None)."""
    stored = checkpoint_quantization(hf_config)
    if stored is not None and path is not None:
        return _from_checkpoint(model, path)
    if requested == "fp8" or stored is not None:
        return Quantization(checkpoint_layers=None)
    return None


def checkpoint_quantization(hf_config: Any) -> str | None:
    """'fp8' for a checkpoint stored in FP8, None for an unquantized one; an error that
    says what loads for any other `quantization_config`."""
    qc = getattr(hf_config, "quantization_config", None)
    if not qc:
        return None
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    method = qc.get("quant_method")
    if method == "fp8" and not qc.get("weight_block_size"):
        return "fp8"
    if method == "compressed-tensors" and _compressed_tensors_fp8(qc):
        return "fp8"
    raise ValueError(
        f"checkpoint quantization {_describe(qc)} is not supported: mii loads FP8 checkpoints "
        "with per-tensor or per-channel scales (quant_method 'fp8', or 'compressed-tensors' "
        "with float8 weights) and quantizes unquantized ones itself (quantization='fp8')"
    )


def _compressed_tensors_fp8(qc: dict) -> bool:
    groups = qc.get("config_groups") or {}
    if not groups or qc.get("format") not in ("float-quantized", "naive-quantized"):
        return False
    for group in groups.values():
        w = group.get("weights") or {}
        if (w.get("num_bits"), w.get("type"), w.get("strategy")) not in (
            (8, "float", "tensor"),
            (8, "float", "channel"),
        ):
            return False
    return True


def _describe(qc: dict) -> str:
    method = qc.get("quant_method")
    if qc.get("weight_block_size"):
        return f"{method!r} with block scales {qc['weight_block_size']}"
    if method == "compressed-tensors":
        return f"'compressed-tensors' in format {qc.get('format')!r} (not float8 weights)"
    return repr(method)


def _from_checkpoint(model: nn.Module, path: str) -> Quantization:
    """The layers that the checkpoint gives a weight scale, with the rows of each weight;
    the experts' scales apart (their weights load dequantized)."""
    layers, dense, experts, rows, kv = set(), set(), {}, {}, {}
    modules = dict(model.named_modules())
    for name, tensor in iterate_checkpoint(path):
        shape = tensor.get_shape() if hasattr(tensor, "get_shape") else tensor.shape
        if name.endswith(".weight") and shape:
            rows[name] = shape[0]
        if kv_cache.CHECKPOINT_SCALE.search(name):
            kv[name] = tensor[...]  # read while the file is open
        if not name.endswith(SCALE):
            continue
        target = parameter_of(model, name)[0].removesuffix(SCALE)
        if isinstance(modules.get(target), ExpertStack):
            experts[name] = tensor[...].float().reshape(-1)  # read while the file is open
        elif isinstance(modules.get(target), LinearBase):
            layers.add(target)
            dense.add(name)
        else:
            raise NotImplementedError(
                f"the checkpoint's float8 weight {name.removesuffix(SCALE)} is not of a "
                "linear layer or experts that mii loads from FP8"
            )
    scale_rows = {s: rows[s.removesuffix(SCALE) + ".weight"] for s in dense}
    return Quantization(frozenset(layers), scale_rows, experts or None, kv or None)


def _gpu_experts(model: nn.Module, device: torch.device) -> Iterator[FusedExperts]:
    """The model's MoE experts where they run in float8: on CUDA."""
    if device.type == "cuda":
        yield from (m for m in model.modules() if isinstance(m, FusedExperts))


def _scale_rows(scale: torch.Tensor, rows: int) -> torch.Tensor:
    """A weight scale as one float32 per row of its weight."""
    scale = scale.float().reshape(-1)
    if scale.numel() == 1:
        return scale.expand(rows).contiguous()
    if scale.numel() != rows:
        raise ValueError(f"a weight scale of {scale.numel()} values for {rows} rows")
    return scale


def _check_device(device: torch.device) -> None:
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < (8, 9):
        raise RuntimeError(
            "FP8 weights need a GPU of compute capability 8.9 or newer (Ada, Hopper); "
            f"{torch.cuda.get_device_name(device)} has "
            f"{'.'.join(map(str, torch.cuda.get_device_capability(device)))}"
        )

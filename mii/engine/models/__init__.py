"""Model registry: the HF config's `architectures` picks the implementation."""

from __future__ import annotations

from typing import Any

from torch import nn

from mii.engine.models.llama import LlamaForCausalLM
from mii.engine.models.opt import OPTForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "OPTForCausalLM": OPTForCausalLM,
}


def model_class(hf_config: Any) -> type[nn.Module]:
    for arch in getattr(hf_config, "architectures", None) or []:
        if arch in MODEL_REGISTRY:
            return MODEL_REGISTRY[arch]
    raise ValueError(
        f"unsupported model architecture {hf_config.architectures}; "
        f"supported: {', '.join(sorted(MODEL_REGISTRY))}"
    )

"""Model registry: the HF config's `architectures` picks the implementation."""

from __future__ import annotations

from typing import Any

from torch import nn

from mii.engine.models.falcon import FalconForCausalLM
from mii.engine.models.gemma2 import Gemma2ForCausalLM
from mii.engine.models.llama import LlamaForCausalLM
from mii.engine.models.moe import LlamaMoeForCausalLM
from mii.engine.models.opt import OPTForCausalLM
from mii.engine.models.phi import PhiForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
    "GemmaForCausalLM": LlamaForCausalLM,
    "Phi3ForCausalLM": LlamaForCausalLM,
    "MixtralForCausalLM": LlamaMoeForCausalLM,
    "Qwen2MoeForCausalLM": LlamaMoeForCausalLM,
    "Gemma2ForCausalLM": Gemma2ForCausalLM,
    "PhiForCausalLM": PhiForCausalLM,
    "FalconForCausalLM": FalconForCausalLM,
    "OPTForCausalLM": OPTForCausalLM,
}


_BY_MODEL_TYPE = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma": "GemmaForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "phi3": "Phi3ForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
    "phi": "PhiForCausalLM",
    "falcon": "FalconForCausalLM",
    "opt": "OPTForCausalLM",
}


def model_class(hf_config: Any) -> type[nn.Module]:
    archs = getattr(hf_config, "architectures", None) or []
    fallback = _BY_MODEL_TYPE.get(getattr(hf_config, "model_type", None))
    for arch in [*archs, fallback]:
        if arch in MODEL_REGISTRY:
            return MODEL_REGISTRY[arch]
    raise ValueError(
        f"unsupported model architecture {hf_config.architectures}; "
        f"supported: {', '.join(sorted(MODEL_REGISTRY))}"
    )

"""Loading a model: where its folder is (local, the demo model, the Hugging Face Hub), then
its config, tokenizer and weights."""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from mii.engine.demo_model import SHORT_NAMES, ensure_demo_model
from mii.engine.hub import SAFETENSORS_INDEX, TORCH_INDEX, hub_model_path, is_hub_name
from mii.engine.models import model_class
from mii.engine.tp.context import ParallelContext


def resolve_model_path(name: str) -> str:
    """A local folder as given, the demo model's folder for its short name (fetched on first
    use), or a Hugging Face Hub name as given: the engine fetches Hub models itself
    (`model_folder`), at the revision of its config, so that every host resolves the same
    name and revision on its own."""
    if os.path.isdir(name):
        return name
    if name.lower() in SHORT_NAMES:
        return str(ensure_demo_model(name))
    if is_hub_name(name):
        return name
    raise FileNotFoundError(
        f"model {name!r} is neither a local Hugging Face folder, a Hub name (org/model) nor "
        f"a known short name ({', '.join(sorted(SHORT_NAMES))})"
    )


def model_folder(name: str, revision: str | None = None, weights: bool = True) -> str:
    """The local folder of a model: `resolve_model_path`'s, with Hub names taken from the
    HF cache or downloaded into it (`weights=False`: config and tokenizer only)."""
    path = resolve_model_path(name)
    if os.path.isdir(path):
        return path
    return hub_model_path(path, revision, weights)


def load_hf_config(path: str) -> Any:
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path, local_files_only=True)


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def eos_token_ids(path: str, hf_config: Any, tokenizer) -> frozenset[int]:
    """EOS ids as transformers' generate sees them: generation_config first, then config."""
    from transformers import GenerationConfig

    try:
        eos = GenerationConfig.from_pretrained(path, local_files_only=True).eos_token_id
    except OSError:
        eos = None
    if eos is None:
        eos = getattr(hf_config, "eos_token_id", None)
    if eos is None and tokenizer is not None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return frozenset()
    return frozenset([eos] if isinstance(eos, int) else eos)


@contextmanager
def _default_dtype(dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_model(
    hf_config: Any,
    dtype: torch.dtype,
    device: torch.device,
    tp: ParallelContext,
    max_pos: int,
    weights_on_meta: bool = False,
) -> nn.Module:
    """The model with uninitialised weights, created in place on the device. With
    `weights_on_meta` its parameters stay on the meta device (buffers, such as rotary
    tables, are made on the device): a quantization replaces the weights it covers before
    `materialize` gives the rest their storage, so that an FP8 model never holds its
    weights in the model's dtype (an FP8 Mixtral-8x7B fits one 80 GB GPU; its bf16 form
    would not)."""
    cls = model_class(hf_config)
    with _default_dtype(dtype), device, _parameters_on_meta(weights_on_meta):
        return cls(hf_config, tp, max_pos).eval()


@contextmanager
def _parameters_on_meta(enabled: bool):
    """Move each parameter to the meta device as a module registers it (one layer's weight
    exists on the device for that moment only), keeping its attributes (weight_loader).
    Process-wide while it lasts: a model is built by one thread."""
    if not enabled:
        yield
        return
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        if param is not None and not param.is_meta:
            meta = nn.Parameter(param.data.to("meta"), requires_grad=param.requires_grad)
            meta.__dict__.update(param.__dict__)
            param = meta
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def materialize(model: nn.Module, device: torch.device) -> None:
    """Uninitialised storage on `device` for every parameter and buffer still on the meta
    device (a parameter shared by two modules, as tied embeddings are, stays shared)."""
    made: dict[int, nn.Parameter] = {}
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is None or not param.is_meta:
                continue
            if id(param) not in made:
                real = torch.empty(param.shape, dtype=param.dtype, device=device)
                made[id(param)] = nn.Parameter(real, requires_grad=param.requires_grad)
                made[id(param)].__dict__.update(param.__dict__)
            module._parameters[name] = made[id(param)]
        for name, buffer in module._buffers.items():
            if buffer is not None and buffer.is_meta:
                module._buffers[name] = torch.empty_like(buffer, device=device)


def _checkpoint_files(path: str) -> tuple[list[str], bool]:
    """The weight files, safetensors first; an index names the shards (a folder may hold
    other copies beside them, as Mistral's `consolidated.safetensors`)."""
    for index, is_safetensors in ((SAFETENSORS_INDEX, True), (TORCH_INDEX, False)):
        if os.path.isfile(os.path.join(path, index)):
            with open(os.path.join(path, index)) as f:
                shards = sorted(set(json.load(f)["weight_map"].values()))
            return [os.path.join(path, s) for s in shards], is_safetensors
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if files:
        single = os.path.join(path, "model.safetensors")
        return ([single] if single in files else files), True
    files = sorted(glob.glob(os.path.join(path, "pytorch_model*.bin")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors or pytorch_model*.bin weights in {path}")
    return files, False


def iterate_checkpoint(path: str) -> Iterator[tuple[str, Any]]:
    """(name, weight) pairs. A safetensors weight comes as a lazy slice that reads from the
    file only what is indexed (`w[a:b]`, `w[:, a:b]`, `w[...]`), so that a tensor-parallel
    rank reads its own shard and never the whole tensor; a torch tensor indexes alike."""
    files, is_safetensors = _checkpoint_files(path)
    for file in files:
        if is_safetensors:
            from safetensors import safe_open

            with safe_open(file, framework="pt", device="cpu") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    yield name, f.get_slice(name)
        else:
            yield from torch.load(file, map_location="cpu", weights_only=True).items()


def _copy(param: nn.Parameter, loaded: Any, shard_id=None) -> None:
    param.data.copy_(loaded[...])


def load_weights(
    model: nn.Module, path: str, weights: Iterable[tuple[str, Any]] | None = None
) -> None:
    """Copy a checkpoint into the model, fusing q/k/v and gate/up; fail on missing weights.
    `weights`: the checkpoint's (name, weight) pairs as a quantization hands them over
    (engine/quantization.py); by default `iterate_checkpoint(path)`'s."""
    params = dict(model.named_parameters())
    missing = set(params)
    for raw_name, tensor in iterate_checkpoint(path) if weights is None else weights:
        name, shard = parameter_of(model, raw_name)
        if any(skip in name for skip in model.skipped_weights):
            continue
        if name not in params:
            if name == "lm_head.weight" and model.tie_word_embeddings:
                continue
            raise KeyError(f"checkpoint weight {raw_name!r} has no place in {type(model).__name__}")
        param = params[name]
        getattr(param, "weight_loader", _copy)(param, tensor, shard)
        missing.discard(name)
    if missing:
        raise KeyError(f"checkpoint {path} lacks weights: {', '.join(sorted(missing)[:8])}")


def parameter_of(model: nn.Module, checkpoint_name: str) -> tuple[str, Any]:
    """The model parameter that a checkpoint weight loads into, and its shard id there."""
    rename = getattr(model, "checkpoint_name", lambda n: n)
    return _packed_target(model, rename(checkpoint_name))


def _packed_target(model: nn.Module, name: str) -> tuple[str, Any]:
    for part, (fused, shard) in model.packed_modules.items():
        if f".{part}." in name:
            return name.replace(f".{part}.", f".{fused}."), shard
    return name, None


def init_random_weights(model: nn.Module, std: float = 0.02, seed: int = 0) -> None:
    """Normal(0, std) weights on the model's device, for benchmarks of real shapes; float8
    weights through their module's `init_random` (quantized draws, with their scales)."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for param in model.parameters():
        if param.dtype != torch.float8_e4m3fn:
            param.data.normal_(0.0, std, generator=gen)
    for module in model.modules():
        if hasattr(module, "init_random"):
            module.init_random(std, gen)

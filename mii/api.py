"""The public entry points: `pipeline`, `serve`, `client` (DeepSpeed-MII's signatures; every
form of passing the configuration that MII accepts: see `mii.config_forms`)."""

from __future__ import annotations

import logging
from typing import Any

from mii.config import MIIConfig, ModelConfig
from mii.config_forms import mii_config_of, model_config_of, reject_unknown
from mii.cpu_threads import prefer_passive_omp_wait
from mii.extras import require
from mii.ignored_options import warn_ignored
from mii.launcher_env import LaunchedRank

log = logging.getLogger(__name__)


def pipeline(
    model_name_or_path: str = "",
    model_config: dict | ModelConfig | None = None,
    all_rank_output: bool = False,
    **kwargs: Any,
):
    """Load a model into this process and return a callable `MIIPipeline`.

    `pipe(prompts, **generate_options)` returns one `Response` per prompt.
    Keyword arguments are `ModelConfig` fields (`tensor_parallel`, `max_length`, `dtype`, ...).

    Under a launcher (`deepspeed --num_gpus N`, `torchrun --nproc_per_node N`) the launched
    processes form one tensor-parallel group of WORLD_SIZE ranks: every rank makes the same
    calls; rank 0 returns the responses, the others None (or the same responses with
    `all_rank_output=True`).
    """
    prefer_passive_omp_wait()  # before anything imports torch
    kwargs = dict(kwargs)
    config = model_config_of(model_name_or_path, model_config, kwargs)
    reject_unknown(kwargs, "pipeline")
    warn_ignored(config)
    _require_for(config.model_name_or_path, "engine", "mii.pipeline")
    from mii.launched_pipeline import start_pipeline

    return start_pipeline(config, all_rank_output)


def serve(
    model_name_or_path: str = "",
    model_config: dict | ModelConfig | None = None,
    mii_config: dict | MIIConfig | None = None,
    **kwargs: Any,
):
    """Start a deployment (workers pulling from Redis streams) and return its `Client`.

    Keyword arguments are `ModelConfig` or `MIIConfig` fields (`deployment_name`,
    `tensor_parallel`, `replica_num`, `max_length`, `redis_url`, ...); `model_config` and
    `mii_config` may be dicts or config objects (MII's precedence: `mii.config_forms`).

    Under a launcher (WORLD_SIZE > 1), rank 0 starts the deployment (its tensor_parallel
    defaults to WORLD_SIZE) and the other ranks return None.
    """
    config = mii_config_of(model_name_or_path, model_config, mii_config, kwargs)
    warn_ignored(config)
    _require_for(config.model_conf.model_name_or_path, "worker", "mii.serve")
    if config.enable_restful_api:
        require("gateway", "mii.serve(enable_restful_api=True)")
    rank = LaunchedRank.from_environment()
    if rank is not None and rank.rank != 0:
        log.info("rank %d of %d: rank 0 serves %s", rank.rank, rank.world_size,
                 config.deployment_name)  # fmt: skip
        return None
    from mii.launch.serve import serve_deployment

    return serve_deployment(config)


def _require_for(model: str, extra: str, what: str) -> None:
    """`extra`'s packages, and the demo extra's when the demo model is still to convert
    (one error naming all that is missing, not one extra after the other)."""
    from mii.engine.demo_model import needs_conversion

    require("demo" if needs_conversion(model) else extra, what)
    require(extra, what)


def client(model_or_deployment_name: str, **kwargs: Any):
    """Connect to a running deployment by name (any process, any host reaching its Redis)."""
    from mii.producer.connect import connect_deployment

    return connect_deployment(model_or_deployment_name, **kwargs)

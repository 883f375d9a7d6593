"""The public entry points: `pipeline`, `serve`, `client` (DeepSpeed-MII's signatures)."""

from __future__ import annotations

from typing import Any

from mii.config import MIIConfig, ModelConfig


def _model_config(model_name_or_path: str, model_config: dict | None, kwargs: dict) -> ModelConfig:
    fields = dict(model_config or {})
    fields.setdefault("model_name_or_path", model_name_or_path)
    model_keys = set(ModelConfig.model_fields)
    for key in [k for k in kwargs if k in model_keys]:
        fields[key] = kwargs.pop(key)
    return ModelConfig(**fields)


def _reject_unknown(kwargs: dict[str, Any], where: str) -> None:
    if kwargs:
        raise TypeError(f"{where}() got unknown option(s): {', '.join(sorted(kwargs))}")


def pipeline(
    model_name_or_path: str = "",
    model_config: dict | None = None,
    all_rank_output: bool = False,
    **kwargs: Any,
):
    """Load a model into this process and return a callable `MIIPipeline`.

    `pipe(prompts, **generate_options)` returns one `Response` per prompt.
    Keyword arguments are `ModelConfig` fields (`tensor_parallel`, `max_length`, `dtype`, ...).
    """
    from mii.local_pipeline import MIIPipeline

    config = _model_config(model_name_or_path, model_config, kwargs)
    _reject_unknown(kwargs, "pipeline")
    return MIIPipeline(config, all_rank_output=all_rank_output)


def serve(
    model_name_or_path: str = "",
    model_config: dict | None = None,
    mii_config: dict | None = None,
    **kwargs: Any,
):
    """Start a deployment (workers pulling from Redis streams) and return its `Client`.

    Keyword arguments are `ModelConfig` or `MIIConfig` fields (`deployment_name`,
    `tensor_parallel`, `replica_num`, `max_length`, `redis_url`, ...).
    """
    from mii.launch.serve import serve_deployment

    config = _model_config(model_name_or_path, model_config, kwargs)
    fields = dict(mii_config or {})
    for key in [k for k in kwargs if k in MIIConfig.model_fields]:
        fields[key] = kwargs.pop(key)
    _reject_unknown(kwargs, "serve")
    return serve_deployment(MIIConfig(model_config=config, **fields))


def client(model_or_deployment_name: str, **kwargs: Any):
    """Connect to a running deployment by name (any process, any host reaching its Redis)."""
    from mii.producer.connect import connect_deployment

    return connect_deployment(model_or_deployment_name, **kwargs)

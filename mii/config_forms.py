"""Every way DeepSpeed-MII's `serve` and `pipeline` take a configuration, resolved into one
`ModelConfig` or `MIIConfig` with MII's precedence (its `mii/api.py`):

- `model_config=` (a dict or a `ModelConfig`) replaces the `model_config` inside
  `mii_config=` (a dict or an `MIIConfig`);
- the positional model and the keyword arguments add to what those set: `ModelConfig`
  fields to the model, `MIIConfig` fields to the deployment, anything else is
  `UnknownArgument`; one that contradicts a value set there is an error (MII asserts that
  they match).

    mii.serve("m", tensor_parallel=2, deployment_name="d")
    mii.serve(model_config={"model_name_or_path": "m"}, mii_config={"deployment_name": "d"})
    mii.serve(mii_config={"deployment_name": "d", "model_config": {"model_name_or_path": "m"}})
    mii.serve(mii_config=MIIConfig(model_config=ModelConfig(model_name_or_path="m")))
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from mii.config import MIIConfig, ModelConfig
from mii.errors import UnknownArgument

_NESTED = ("model_config", "model_conf")  # MIIConfig's field, by its alias and its name


def model_config_of(
    model_name_or_path: str, model_config: dict | ModelConfig | None, kwargs: dict[str, Any]
) -> ModelConfig:
    """The model's config; takes the `ModelConfig` fields out of `kwargs`."""
    fields = _fields(model_config, ModelConfig, "model_config")
    if model_name_or_path:
        _add(fields, "model_name_or_path", model_name_or_path, "model_config")
    for key in [k for k in kwargs if k in ModelConfig.model_fields]:
        _add(fields, key, kwargs.pop(key), "model_config")
    return ModelConfig(**fields)


def mii_config_of(
    model_name_or_path: str,
    model_config: dict | ModelConfig | None,
    mii_config: dict | MIIConfig | None,
    kwargs: dict[str, Any],
) -> MIIConfig:
    """The deployment's config; every keyword argument must be a field of either config."""
    kwargs = dict(kwargs)
    fields = _fields(mii_config, MIIConfig, "mii_config")
    nested = [fields.pop(key) for key in _NESTED if key in fields]
    if model_config is None and nested:
        model_config = nested[0]
    model = model_config_of(model_name_or_path, model_config, kwargs)
    for key in [k for k in kwargs if k in MIIConfig.model_fields and k not in _NESTED]:
        _add(fields, key, kwargs.pop(key), "mii_config")
    reject_unknown(kwargs, "serve")
    return MIIConfig(model_config=model, **fields)


def reject_unknown(kwargs: dict[str, Any], where: str) -> None:
    if kwargs:
        raise UnknownArgument(
            f"{where}() got keyword argument(s) that are neither ModelConfig nor MIIConfig "
            f"fields: {', '.join(sorted(kwargs))}"
        )


def _fields(config: Any, cls: type[BaseModel], name: str) -> dict[str, Any]:
    """The values a config sets: a dict's items, or the fields a config object was given."""
    if config is None:
        return {}
    if isinstance(config, cls):
        return config.model_dump(exclude_unset=True, by_alias=True)
    if isinstance(config, dict):
        return dict(config)
    raise TypeError(f"{name} must be a dict or a {cls.__name__}, not {type(config).__name__}")


def _add(fields: dict[str, Any], key: str, value: Any, where: str) -> None:
    if key in fields and fields[key] != value:
        raise ValueError(f"{key}={value!r} contradicts {where}'s {key}={fields[key]!r}")
    fields[key] = value

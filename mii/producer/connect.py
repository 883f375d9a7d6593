"""`mii.client(name)`: find a deployment's Redis and its recorded config."""

from __future__ import annotations

import os

from mii.broker_config.connection import CONNECTION_ERRORS
from mii.broker_config.connection import connect as redis_connect
from mii.broker_config.deployment import load_record, remembered_url
from mii.broker_config.keys import DeploymentKeys
from mii.broker_config.settings import DEFAULT_REDIS_URL, explicit_redis_url, redact_url
from mii.config import MIIConfig
from mii.errors import DeploymentNotFoundError
from mii.producer.client import Client


def candidate_names(name: str) -> list[str]:
    """A deployment name, or a model name and MII's default deployment name for it."""
    derived = f"{os.path.basename(name.rstrip('/'))}-mii-deployment"
    return [name] if derived == name else [name, derived]


def connect_deployment(
    model_or_deployment_name: str, redis_url: str | None = None, **kwargs
) -> Client:
    """A `Client` for a running deployment. The Redis is `redis_url`, else `MII_REDIS_URL`,
    else an embedded one this host's `mii.serve` noted, else redis://127.0.0.1:6379."""
    names = candidate_names(model_or_deployment_name)
    explicit = explicit_redis_url(redis_url)
    urls = [explicit] if explicit else _implicit_urls(names)
    for url in urls:
        found = _find(url, names)
        if found is not None:
            redis, mii_config = found
            return Client(mii_config, url, redis_client=redis, **kwargs)
    where = ", ".join(redact_url(u) for u in urls)
    raise DeploymentNotFoundError(
        f"no deployment named {' or '.join(repr(n) for n in names)} in the Redis at {where}"
    )


def _implicit_urls(names: list[str]) -> list[str]:
    remembered = [u for u in (remembered_url(n) for n in names) if u]
    return [*dict.fromkeys([*remembered, DEFAULT_REDIS_URL])]


def _find(url: str, names: list[str]):
    redis = redis_connect(url)
    for name in names:
        try:
            record = load_record(redis, DeploymentKeys(name))
        except DeploymentNotFoundError:
            continue
        except CONNECTION_ERRORS:
            break
        return redis, MIIConfig.model_validate(record.mii_config)
    redis.close()
    return None

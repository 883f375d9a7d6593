"""`mii.client(name)`: find a deployment's Redis and its recorded config.

Each failure says what it is: a Redis that refused the credentials, no Redis answering at
the address, or a Redis that answers without a record of the deployment. URLs in messages
never show a password.
"""

from __future__ import annotations

import os

import redis

from mii.broker_config.connection import CONNECTION_ERRORS
from mii.broker_config.connection import connect as redis_connect
from mii.broker_config.deployment import load_record, remembered_url
from mii.broker_config.keys import DeploymentKeys
from mii.broker_config.settings import DEFAULT_REDIS_URL, explicit_redis_url, redact_url
from mii.config import MIIConfig
from mii.errors import DeploymentNotFoundError, MIIError
from mii.producer.client import Client
from mii.producer.outage import broker_unavailable


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
    failures: dict[str, Exception] = {}
    for url in urls:
        try:
            found = _find(url, names)
        except CONNECTION_ERRORS as exc:
            failures[url] = exc
            continue
        if found is not None:
            connection, mii_config = found
            return Client(mii_config, url, redis_client=connection, **kwargs)
    raise _not_found(names, urls, failures)


def _implicit_urls(names: list[str]) -> list[str]:
    remembered = [u for u in (remembered_url(n) for n in names) if u]
    return [*dict.fromkeys([*remembered, DEFAULT_REDIS_URL])]


def _find(url: str, names: list[str]):
    """(connection, config) of the first name recorded at `url`; None if none is;
    connection errors (an authentication refusal among them) propagate."""
    connection = redis_connect(url)
    try:
        for name in names:
            try:
                record = load_record(connection, DeploymentKeys(name))
            except DeploymentNotFoundError:
                continue
            return connection, MIIConfig.model_validate(record.mii_config)
    except BaseException:
        connection.close()
        raise
    connection.close()
    return None


def _not_found(names: list[str], urls: list[str], failures: dict[str, Exception]) -> MIIError:
    """The error that says why no URL led to the deployment: credentials refused first,
    then no Redis answering anywhere, else no such deployment where one answered."""
    refused = [(u, e) for u, e in failures.items() if isinstance(e, redis.AuthenticationError)]
    if refused:
        url, exc = refused[0]
        return broker_unavailable(exc, [url])
    if len(failures) == len(urls):
        return broker_unavailable(failures[urls[-1]], urls)
    answered = ", ".join(redact_url(u) for u in urls if u not in failures)
    silent = [redact_url(u) for u in urls if u in failures]
    also = f" (no Redis answers at {', '.join(silent)})" if silent else ""
    return DeploymentNotFoundError(
        f"no deployment named {' or '.join(repr(n) for n in names)} in the Redis at "
        f"{answered}{also}"
    )

"""Connections: TLS and ACL users come from the URL; backoff grows and is capped."""

from __future__ import annotations

import pytest
import redis

from mii.broker_config.connection import Backoff, connect, retry_until

pytestmark = pytest.mark.timeout(5)


def test_rediss_urls_connect_over_tls_with_the_url_credentials():
    client = connect("rediss://alice:s3cret@redis.example:6380/2")
    pool = client.connection_pool
    assert issubclass(pool.connection_class, redis.SSLConnection)
    kwargs = pool.connection_kwargs
    assert (kwargs["username"], kwargs["password"], kwargs["port"], kwargs["db"]) == (
        "alice",
        "s3cret",
        6380,
        2,
    )


def test_backoff_grows_and_is_capped():
    backoff = Backoff(base_s=0.1, cap_s=0.4)
    delays = [backoff.next_delay() for _ in range(6)]
    assert all(0.05 <= d <= 0.4 for d in delays) and delays[-1] >= 0.2
    backoff.reset()
    assert backoff.next_delay() <= 0.1


def test_retry_until_waits_out_connection_errors_then_gives_up():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise redis.ConnectionError("down")
        return "up"

    assert retry_until(flaky, give_up_after_s=2, backoff=Backoff(0.001, 0.002)) == "up"

    def down():
        raise redis.ConnectionError("down")

    with pytest.raises(redis.ConnectionError):
        retry_until(down, give_up_after_s=0.05, backoff=Backoff(0.001, 0.002))

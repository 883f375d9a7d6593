"""Keys on a Redis Cluster: a request's keys share one slot, the partitions spread over
the primaries, and `connect` makes the cluster client for a `redis+cluster://` URL."""

from __future__ import annotations

import pytest
import redis

from mii.broker_config.connection import connect, is_cluster_client
from mii.broker_config.keys import DeploymentKeys, slot
from mii.broker_config.settings import check_redis_url, is_cluster_url, redact_url

pytestmark = pytest.mark.timeout(60)


def test_one_partition_is_todays_layout():
    keys = DeploymentKeys("dep")
    assert keys.request_streams() == ("mii:{dep}:requests", "mii:{dep}:bulk")
    assert keys.claim("r1") == "mii:{dep}:claim:r1"
    assert keys.replies("c1") == "mii:{dep}:replies:c1"
    assert keys.prefixes == ("mii:{dep}",)


@pytest.mark.parametrize("partitions", [2, 3, 6])
def test_a_requests_keys_share_its_partitions_slot(partitions):
    keys = DeploymentKeys("dep", partitions)
    for partition in range(partitions):
        reply = keys.new_id(partition)
        rid = keys.new_id(keys.partition(reply))
        own = [keys.requests_of(reply), keys.replies(reply), keys.claim(rid),
               keys.cancelled(rid), keys.response(rid)]  # fmt: skip
        slots = {slot(k) for k in own}
        assert slots == {slot(keys.request_partitions[partition])}
    deployment_wide = [keys.config, keys.state, keys.workers, keys.control, keys.deadletter,
                       keys.bulk, keys.client_alive("h:1"), *keys.job("j").all()]  # fmt: skip
    assert {slot(k) for k in deployment_wide} == {slot(keys.config)}


def test_partitions_fall_in_even_shares_of_the_slots():
    keys = DeploymentKeys("some/deployment", 6)
    for i, stream in enumerate(keys.request_partitions):
        assert i * 16384 // 6 <= slot(stream) < (i + 1) * 16384 // 6


def test_cluster_urls():
    url = "redis+cluster://user:secret@10.0.0.1:7000,10.0.0.2:7001"
    check_redis_url(url)
    assert is_cluster_url(url) and not is_cluster_url("redis://h:1/0")
    assert redact_url(url) == "redis+cluster://user:***@10.0.0.1:7000,10.0.0.2:7001"
    with pytest.raises(ValueError, match="database 0"):
        connect("redis+cluster://127.0.0.1:7000/3")
    with pytest.raises(ValueError, match="host:port"):
        connect("redis+cluster://127.0.0.1")


def test_partitions_spread_over_the_primaries(redis_cluster):
    keys = DeploymentKeys("spread-dep", 3)
    primaries = {redis_cluster.primary_of(s) for s in keys.request_partitions}
    assert len(primaries) == 3
    assert redis_cluster.primary_of(keys.config) in primaries


def test_connect_makes_the_cluster_client_and_transactions_stay_in_one_slot(redis_cluster):
    client = connect(redis_cluster.url)
    try:
        assert is_cluster_client(client)
        keys = DeploymentKeys("tx-dep", 3)
        rid = keys.new_id(2)
        pipe = client.pipeline(transaction=True)
        pipe.xadd(keys.replies(keys.new_id(2)), {"p": b"x"})
        pipe.set(keys.claim(rid), "s 1-0", ex=60)
        pipe.xadd(keys.request_partitions[2], {"rid": rid})
        assert len(pipe.execute()) == 3
        pipe = client.pipeline(transaction=True)
        pipe.set(keys.claim(rid), 1)
        pipe.set(keys.config, 1)
        with pytest.raises(redis.RedisClusterException):
            pipe.execute()  # across slots: what the partitioned layout never asks for
    finally:
        client.close()

"""A Redis outage longer than `reconnect_timeout_s` (issue 12, item 8, the client's side):
`BrokerUnavailableError` on every path, sync and async, and the abandoned requests are
cancelled at the next successful Redis call or at close()."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from harness import Harness

from mii.broker_config import wire
from mii.errors import BrokerUnavailableError, MIIError

pytestmark = pytest.mark.timeout(30)
GIVE_UP_S = 0.3


@pytest.fixture
def harness():
    h = Harness(reconnect_timeout_s=GIVE_UP_S)
    yield h
    h.server.connected = True
    h.stop()


def _down(h: Harness) -> None:
    h.server.connected = False


def _up(h: Harness) -> None:
    h.server.connected = True


def _cancelled(h: Harness) -> set[str]:
    """Request ids with a cancel marker and a cancel control message."""
    marked = {k.decode().rsplit(":", 1)[1] for k in h.redis.keys(h.keys.cancelled("*"))}
    sent = {wire.decode_control(f).rid for _, f in h.redis.xrange(h.keys.control)}
    return marked & sent


def _raises_unavailable(call) -> BrokerUnavailableError:
    start = time.monotonic()
    with pytest.raises(BrokerUnavailableError, match="no Redis answers.*reconnect_timeout_s") as e:
        call()
    assert GIVE_UP_S <= time.monotonic() - start < GIVE_UP_S + 2
    assert isinstance(e.value, MIIError)
    return e.value


def test_submit_during_an_outage_is_abandoned_then_cancelled(harness):
    client = harness.client()
    _down(harness)
    _raises_unavailable(lambda: client.generate("lost in transit", max_new_tokens=2))
    (owed,) = client._abandoned.take()  # the script may have run before the reply was lost
    client._abandoned.add([owed])
    _up(harness)
    client.cancel_many([])  # any successful call pays what is owed
    assert _cancelled(harness) == {owed}


def test_a_wait_cut_off_cancels_its_request_when_redis_is_back(harness):
    client = harness.client()
    requests = client.submit(["cut off"], max_new_tokens=2)
    rid = requests.requests[0].rid
    threading.Timer(0.05, _down, args=(harness,)).start()

    _raises_unavailable(requests.wait)  # its cleanup cannot reach Redis either
    _up(harness)
    assert _cancelled(harness) == set()
    client.submit(["next"])  # the next successful call sends the cancel
    assert _cancelled(harness) == {rid}


def test_cancel_during_an_outage_is_sent_at_close(harness):
    client = harness.client()
    _down(harness)
    _raises_unavailable(lambda: client.cancel("0123abcd"))
    _up(harness)
    client.close()
    assert _cancelled(harness) == {"0123abcd"}


def test_async_calls_give_up_alike(harness):
    client = harness.client()

    rids = []

    async def submit():
        _down(harness)
        await client.agenerate("async", max_new_tokens=2)

    async def follow():
        requests = await client._asubmit(["async wait"], {"max_new_tokens": 2})
        rids.append(requests.requests[0].rid)
        _down(harness)
        try:
            async for _ in client._afollow(requests):
                pass
        finally:
            await client._acleanup(requests)

    _raises_unavailable(lambda: asyncio.run(submit()))
    (first,) = client._abandoned.take()
    client._abandoned.add([first])
    _up(harness)
    _raises_unavailable(lambda: asyncio.run(follow()))  # its submit paid the first cancel
    _up(harness)
    assert _cancelled(harness) == {first}
    assert client._abandoned.take() == rids


def test_messages_show_no_password(harness):
    client = harness.client()
    client.redis_url = "redis://:hunter2@db.example:6379/0"
    _down(harness)
    error = _raises_unavailable(lambda: client.generate("x"))
    assert "hunter2" not in str(error) and "redis://:***@db.example:6379/0" in str(error)

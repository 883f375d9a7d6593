"""A deployment on fakeredis: a `WorkerLoop` with the fake engine in a thread, and clients."""

from __future__ import annotations

import threading
import time

import fakeredis
from fake_engine import FakeEngine

from mii.broker_config.deployment import DeploymentRecord, save_record
from mii.broker_config.keys import DeploymentKeys
from mii.broker_config.settings import BrokerSettings
from mii.config import MIIConfig
from mii.producer.client import Client
from mii.worker.loop import WorkerLoop

FAST = dict(heartbeat_interval_s=0.05, reclaim_idle_s=0.3, block_ms=20, drain_timeout_s=5)


class Harness:
    def __init__(self, deployment: str = "test-dep", **settings) -> None:
        self.server = fakeredis.FakeServer()
        self.redis = self.connection()
        self.settings = BrokerSettings(**{**FAST, **settings})
        self.keys = DeploymentKeys(deployment)
        self.mii_config = MIIConfig(
            model_config={"model_name_or_path": "fake"},
            deployment_name=deployment,
            broker=self.settings.model_dump(),
        )
        record = DeploymentRecord(mii_config=self.mii_config.model_dump(mode="json", by_alias=True))
        save_record(self.redis, self.keys, record)
        self.record = record
        self.workers: list[tuple[WorkerLoop, threading.Thread]] = []
        self.errors: list[BaseException] = []

    def connection(self):
        return fakeredis.FakeRedis(server=self.server)

    def client(self, **kwargs) -> Client:
        return Client(
            self.mii_config,
            redis_client=self.connection(),
            async_redis_factory=lambda: fakeredis.FakeAsyncRedis(server=self.server),
            **kwargs,
        )

    def loop(self, engine: FakeEngine | None = None, consumer: str | None = None) -> WorkerLoop:
        engine = engine or FakeEngine()
        consumer = consumer or f"testhost:{len(self.workers) + 1}"
        # fakeredis runs Lua on one shared runtime that is not thread-safe: plain commands
        return WorkerLoop(
            engine,
            self.connection(),
            self.keys.deployment,
            self.settings,
            consumer,
            poll_script=False,
            record=self.record,
        )

    def start(self, engine: FakeEngine | None = None, consumer: str | None = None) -> WorkerLoop:
        loop = self.loop(engine, consumer)
        thread = threading.Thread(target=self._run, args=(loop,), daemon=True)
        thread.start()
        self.workers.append((loop, thread))
        wait_for(lambda: loop.publisher._thread.is_alive(), what="worker start")
        return loop

    def _run(self, loop: WorkerLoop) -> None:
        try:
            loop.run()
        except BaseException as exc:  # the test looks at it
            self.errors.append(exc)

    def stop(self) -> None:
        for loop, thread in self.workers:
            loop.stop()
            thread.join(10)

    def response_chunks(self, rid: str):
        return read_chunks(self.redis, self.keys, rid)


def read_chunks(redis, keys: DeploymentKeys, rid: str):
    """A request's chunks: its own response stream, or its part of a reply stream."""
    from mii.broker_config import wire

    own = [wire.decode_chunk(f) for _, f in redis.xrange(keys.response(rid))]
    if own:
        return own
    chunks = []
    for key in sorted(redis.scan_iter(match=keys.replies("*"))):
        for _, fields in redis.xrange(key):
            chunks += [chunk for r, chunk in wire.decode_reply(fields) if r == rid]
    return chunks


def wait_for(predicate, timeout_s: float = 10.0, what: str = "condition"):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")

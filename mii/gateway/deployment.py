"""The deployment a gateway serves: its client, the names it answers to, and a short-lived
view of its workers (is any alive? how deep are its queues?)."""

from __future__ import annotations

import logging
import os
import time

import anyio
import anyio.to_thread

from mii.broker_config.deployment import live_workers
from mii.gateway.errors import no_live_worker, not_found
from mii.gateway.settings import GatewaySettings

log = logging.getLogger(__name__)


class Deployment:
    def __init__(self, client, settings: GatewaySettings) -> None:
        """`client`: a `mii.producer.client.Client` of the deployment."""
        self.client = client
        self.settings = settings
        self.name = client.deployment_name
        self.model = client.mii_config.model_conf.model_name_or_path
        self.created = int(time.time())
        self.names = {self.name, self.model, os.path.basename(self.model.rstrip("/"))}
        self._live: tuple[float, int] = (float("-inf"), 0)  # (checked at, live workers)

    @property
    def timeout_s(self) -> float | None:
        """The deadline each generation request gets."""
        return self.settings.request_timeout_s or self.client.settings.request_timeout_s

    def check_model(self, model: str | None) -> None:
        """404 unless `model` names this deployment (None: the request names none)."""
        if model is not None and model not in self.names:
            raise not_found(f"The model `{model}` does not exist", code="model_not_found")

    async def live_workers(self, fresh: bool = False) -> int:
        """How many workers have a recent heartbeat. `watch_workers` keeps the count fresh
        off the request path; a count older than twice `live_check_s` is read here."""
        checked, count = self._live
        if fresh or time.monotonic() - checked > 2 * self.settings.live_check_s:
            count = await self._refresh()
        return count

    async def watch_workers(self) -> None:
        """Refresh the live-worker count every `live_check_s`, until cancelled."""
        while True:
            try:
                await self._refresh()
            except Exception as exc:  # noqa: BLE001 (Redis away: requests find out themselves)
                log.warning("cannot read the workers' heartbeats: %s", exc)
            await anyio.sleep(self.settings.live_check_s)

    async def _refresh(self) -> int:
        count = await anyio.to_thread.run_sync(self._count_live)
        self._live = (time.monotonic(), count)
        return count

    async def require_live_worker(self) -> None:
        """503 when no worker would take a request now."""
        if not await self.live_workers():
            raise no_live_worker(self.name)

    def _count_live(self) -> int:
        settings = self.client.settings
        return len(live_workers(self.client.redis, self.client.keys, settings.dead_after_s))

    def queue_depths(self) -> dict[str, int]:
        """Entries in the interactive and bulk request streams (blocking: call in a thread)."""
        keys, redis = self.client.keys, self.client.redis
        pipe = redis.pipeline(transaction=False)
        for stream in keys.request_streams():
            pipe.xlen(stream)
        *interactive, bulk = pipe.execute()
        return {"requests": sum(interactive), "bulk": bulk}

    def model_card(self) -> dict:
        return {"id": self.name, "object": "model", "created": self.created,
                "owned_by": "mii", "root": self.model}  # fmt: skip

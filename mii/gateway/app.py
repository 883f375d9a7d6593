"""`create_app`: the gateway's ASGI application for one deployment.

    app = create_app(GatewaySettings(deployment="smollm2-mii-deployment"))
    uvicorn.run(app, port=8000)          # what `mii gateway` does (mii.gateway.server)

Routes: `routes.ROUTES` (OpenAI completions, chat, models; MII's `/mii/{deployment}`;
`/healthz`, `/health`, `/metrics`) and `batch_routes.ROUTES` (files, batches). Every error
leaves as OpenAI's error body with its status code.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import anyio.to_thread
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware

from mii.errors import MIIError
from mii.gateway import batch_routes, routes
from mii.gateway.batches import Batches
from mii.gateway.deployment import Deployment
from mii.gateway.errors import APIError, api_error, error_response
from mii.gateway.files import FolderFiles, RedisFiles
from mii.gateway.metrics import GatewayMetrics
from mii.gateway.middleware import ApiKeys, BodyLimit, CountRequests
from mii.gateway.settings import GatewaySettings

log = logging.getLogger(__name__)


@dataclass
class Gateway:
    """What the handlers share (`request.app.state.gateway`)."""

    settings: GatewaySettings
    deployment: Deployment
    metrics: GatewayMetrics
    files: RedisFiles | FolderFiles
    batches: Batches


def connect_client(settings: GatewaySettings):
    from mii.producer.connect import connect_deployment

    return connect_deployment(settings.deployment, settings.redis_url)


def create_app(settings: GatewaySettings, client=None) -> Starlette:
    """The app for `settings.deployment`; `client` replaces the one made from the settings
    (tests pass one on fakeredis)."""
    client = client if client is not None else connect_client(settings)
    gateway = _gateway(settings, client)
    all_routes = [*routes.ROUTES, *batch_routes.ROUTES]
    app = Starlette(
        routes=all_routes,
        middleware=_middleware(settings, gateway.metrics, all_routes),
        exception_handlers={APIError: _on_error, MIIError: _on_error, Exception: _on_error},
        lifespan=_lifespan(gateway),
    )
    app.state.gateway = gateway
    return app


def _gateway(settings: GatewaySettings, client) -> Gateway:
    ttl_s = client.settings.bulk_job_ttl_s
    if settings.files_dir:
        files = FolderFiles(settings.files_dir)
    else:
        files = RedisFiles(client.redis, client.keys, ttl_s)
    deployment = Deployment(client, settings)
    return Gateway(settings, deployment, GatewayMetrics(), files, Batches(client, files))


def _middleware(settings: GatewaySettings, metrics: GatewayMetrics, all_routes) -> list:
    stack = []
    if settings.cors_origins:
        stack.append(Middleware(CORSMiddleware, allow_origins=list(settings.cors_origins),
                                allow_methods=["*"], allow_headers=["*"]))  # fmt: skip
    stack.append(Middleware(CountRequests, metrics=metrics, routes=all_routes))
    stack.append(Middleware(BodyLimit, limit=settings.max_body_bytes))
    stack.append(Middleware(ApiKeys, keys=settings.all_api_keys()))
    return stack


async def _on_error(request, exc: Exception):
    error = api_error(exc, request.app.state.gateway.settings.retry_after_s)
    if error.status >= 500 and not isinstance(exc, APIError | MIIError):
        log.error("%s %s failed", request.method, request.url.path, exc_info=exc)
    return error_response(error)


def _lifespan(gateway: Gateway):
    @contextlib.asynccontextmanager
    async def lifespan(app):
        # batches a gateway left half-queued (it died): resume them in the background
        resume = anyio.to_thread.run_sync(gateway.batches.resume_all)
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(_quietly, resume)
            tasks.start_soon(gateway.deployment.watch_workers)
            yield
            tasks.cancel_scope.cancel()
        gateway.deployment.client.close()

    return lifespan


async def _quietly(awaitable) -> None:
    try:
        await awaitable
    except Exception:  # noqa: BLE001 (a start-up chore; each batch resumes when asked about)
        log.exception("resuming unfinished batches failed")

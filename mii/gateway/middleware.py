"""Plain ASGI middleware around every route: API keys, the body size limit, request
counts by route and status. (Plain ASGI, not Starlette's BaseHTTPMiddleware, so that
streamed responses pass through untouched.)"""

from __future__ import annotations

import hmac

from starlette.routing import Match

from mii.gateway.errors import APIError, error_response
from mii.gateway.metrics import GatewayMetrics

PROTECTED = ("/v1/", "/mii/")
"""Path prefixes that need an API key when keys are configured (/health, /healthz and
/metrics stay open for probes and scrapers)."""


def key_accepted(header: str | None, keys: tuple[str, ...]) -> bool:
    """`Authorization: Bearer <key>` names one of `keys`; every key is compared (in
    constant time), so the time taken says nothing about which one came close."""
    scheme, _, given = (header or "").partition(" ")
    if scheme.lower() != "bearer" or not given:
        return False
    matches = [hmac.compare_digest(given.strip().encode(), k.encode()) for k in keys]
    return any(matches)


class ApiKeys:
    def __init__(self, app, keys: tuple[str, ...]) -> None:
        self.app, self.keys = app, keys

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and self.keys and scope["path"].startswith(PROTECTED):
            headers = dict(scope["headers"])
            auth = headers.get(b"authorization", b"").decode("latin-1")
            if not key_accepted(auth, self.keys):
                error = APIError(401, "Incorrect or missing API key (Authorization: Bearer "
                                 "<key>)", code="invalid_api_key")  # fmt: skip
                await error_response(error)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BodyLimit:
    """413 for a body over `limit` bytes: at once when Content-Length says so, else as
    soon as the bytes read pass it."""

    def __init__(self, app, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await error_response(self._error())(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise self._error()
            return message

        await self.app(scope, counted, send)

    def _error(self) -> APIError:
        return APIError(413, f"request body over the limit of {self.limit} bytes",
                        code="request_too_large")  # fmt: skip


class CountRequests:
    """`mii_gateway_requests{route, status}` for every answered request."""

    def __init__(self, app, metrics: GatewayMetrics, routes) -> None:
        self.app, self.metrics, self.routes = app, metrics, routes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = self._route(scope)

        async def counting(message):
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(route, str(message["status"])).inc()
            await send(message)

        await self.app(scope, receive, counting)

    def _route(self, scope) -> str:
        for route in self.routes:
            if route.matches(scope)[0] == Match.FULL:
                return route.path
        return "other"

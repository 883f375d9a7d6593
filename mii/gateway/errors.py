"""Errors as OpenAI answers them: a status code and `{"error": {"message", "type",
"param", "code"}}`. `api_error` maps mii's exceptions; `error_response` renders one."""

from __future__ import annotations

from starlette.responses import JSONResponse

from mii.broker_config.connection import CONNECTION_ERRORS
from mii.errors import (
    BrokerUnavailableError,
    DeploymentFailedError,
    GenerationError,
    InvalidRequestError,
    QueueFullError,
    RequestTimeoutError,
)


class APIError(Exception):
    """An HTTP error with OpenAI's body."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind
        self.param, self.code, self.headers = param, code, headers or {}

    def body(self) -> dict:
        error = {"message": self.message, "type": self.kind, "param": self.param}
        return {"error": error | {"code": self.code}}


class ClientGone(Exception):
    """The HTTP client disconnected before its answer was ready."""


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def not_found(message: str, code: str = "not_found") -> APIError:
    return APIError(404, message, code=code)


def no_live_worker(deployment: str) -> APIError:
    return APIError(503, f"no live worker serves deployment {deployment!r}",
                    "service_unavailable", code="no_live_worker")  # fmt: skip


def api_error(exc: Exception, retry_after_s: int = 1) -> APIError:
    """The HTTP error for an exception raised while serving a request."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ClientGone):  # nobody reads this answer; nginx's code for it
        return APIError(499, "the client closed the request", code="client_closed_request")
    if isinstance(exc, QueueFullError):
        headers = {"Retry-After": str(retry_after_s)}
        return APIError(429, str(exc), "rate_limit_error", code="queue_full", headers=headers)
    if isinstance(exc, InvalidRequestError):
        return APIError(400, str(exc), param=getattr(exc, "param", None))
    if isinstance(exc, RequestTimeoutError):
        return APIError(504, str(exc), "timeout_error", code="request_timeout")
    if isinstance(exc, DeploymentFailedError | BrokerUnavailableError | CONNECTION_ERRORS):
        return APIError(503, str(exc) or "the deployment's Redis is unreachable",
                        "service_unavailable", code="unavailable")  # fmt: skip
    if isinstance(exc, GenerationError):
        return APIError(500, str(exc), "server_error", code="generation_error")
    return APIError(500, f"internal error: {type(exc).__name__}", "server_error")


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

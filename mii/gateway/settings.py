"""`GatewaySettings`: which deployment a gateway serves and how (typed, validated)."""

from __future__ import annotations

import os

from pydantic import BaseModel, ConfigDict, Field

API_KEYS_ENV = "MII_API_KEYS"
"""Comma-separated API keys; any of them is accepted (`--api-key` adds more)."""


class GatewaySettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    deployment: str
    """The deployment (or model) name, as `mii.client` takes it."""
    redis_url: str | None = None
    """None: `MII_REDIS_URL`, else where `mii.client` finds the deployment."""
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    api_keys: tuple[str, ...] = ()
    """Bearer keys the /v1 and /mii routes require; empty: no key needed."""
    max_body_bytes: int = Field(64 << 20, gt=0)
    """Largest request body (a batch input file included); larger ones get 413."""
    request_timeout_s: float | None = Field(None, gt=0)
    """Deadline of a generation request; None: the deployment's `request_timeout_s`."""
    cors_origins: tuple[str, ...] = ()
    """Origins browsers may call from ("*" for any); empty: CORS off."""
    files_dir: str | None = None
    """Keep uploaded files in this folder (shared by every gateway of the deployment);
    None: in Redis, with the TTL of the deployment's bulk jobs."""
    live_check_s: float = Field(1.0, gt=0)
    """How long a gateway trusts its last look at the workers' heartbeats."""
    retry_after_s: int = Field(1, ge=0)
    """`Retry-After` of a 429 (queue full)."""

    def all_api_keys(self) -> tuple[str, ...]:
        """The configured keys plus those in `MII_API_KEYS`."""
        env = [k.strip() for k in os.environ.get(API_KEYS_ENV, "").split(",") if k.strip()]
        return tuple(dict.fromkeys([*self.api_keys, *env]))

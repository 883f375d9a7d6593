"""Running a gateway in this process (`serve`, what `mii gateway` calls; `mii.serve(...,
enable_restful_api=True)` starts that command as a child process, `mii.launch.gateway`)."""

from __future__ import annotations

import os

from mii.gateway.settings import GatewaySettings

READY_TIMEOUT_S = 60.0
SETTINGS_ENV = "MII_GATEWAY_SETTINGS"
"""The settings (JSON) of the processes of a gateway started with `workers` > 1."""


def serve(settings: GatewaySettings, log_level: str = "info", workers: int = 1) -> None:
    """Serve until SIGINT / SIGTERM (uvicorn finishes open streams for a few seconds).
    `workers` > 1: that many processes share the port (one Python process streams a few
    thousand tokens/s; the gateway keeps no state, so processes scale it over cores).
    Each process counts its own metrics."""
    import uvicorn

    options = dict(host=settings.host, port=settings.port, log_level=log_level,
                   timeout_graceful_shutdown=10)  # fmt: skip
    if workers > 1:
        os.environ[SETTINGS_ENV] = settings.model_dump_json()
        uvicorn.run("mii.gateway.server:app_from_env", factory=True, workers=workers, **options)
        return
    from mii.gateway.app import create_app

    uvicorn.run(create_app(settings), **options)


def app_from_env():
    """The app factory of each process of a multi-process gateway."""
    from mii.gateway.app import create_app

    return create_app(GatewaySettings.model_validate_json(os.environ[SETTINGS_ENV]))

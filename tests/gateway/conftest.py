"""Gateway tests: fast ones on the fakeredis harness with the fake engine, real ones on a
real Redis with SmolLM2 (test_smollm2_*)."""

from __future__ import annotations

import os
import sys

import pytest

HERE = os.path.dirname(__file__)
sys.path.insert(0, HERE)

from gateway_server import ThreadedGateway  # noqa: E402

from mii.gateway.app import create_app  # noqa: E402
from mii.gateway.settings import GatewaySettings  # noqa: E402


@pytest.fixture
def gateway_for(harness):
    """gateway_for(**settings) -> a running gateway over the harness's deployment."""
    started: list[ThreadedGateway] = []

    def make(**settings) -> ThreadedGateway:
        app = create_app(GatewaySettings(deployment=harness.keys.deployment, **settings),
                         client=harness.client())  # fmt: skip
        started.append(ThreadedGateway(app).start())
        return started[-1]

    yield make
    for gateway in started:
        gateway.stop()

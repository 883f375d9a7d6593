"""Helpers for tests that serve deployments with real worker processes running the fake
engine (see `worker_env` and `private_redis` in conftest.py)."""

from __future__ import annotations

from mii.config import MIIConfig

FAKE = "fake_engine:make_fake_engine"


def fake_config(name: str, **fields) -> MIIConfig:
    """A deployment of the fake model named `name`; `fields` are MIIConfig fields."""
    return MIIConfig(model_config={"model_name_or_path": "fake"}, deployment_name=name, **fields)

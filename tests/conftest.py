"""Shared fixtures: tiny random models of every architecture, the demo model."""

from __future__ import annotations

import os

import pytest
import torch
from tiny_models import build_tiny_model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """tiny_model(arch) -> folder of a tiny random HF model of that architecture."""
    made: dict[str, str] = {}

    def make(arch: str) -> str:
        if arch not in made:
            made[arch] = build_tiny_model(arch, str(tmp_path_factory.mktemp(arch)))
        return made[arch]

    return make


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    """The real demo model (fetched and converted on first use, then cached)."""
    from mii.engine.demo_model import ensure_demo_model

    return str(ensure_demo_model("smollm2", quiet=True))


@pytest.fixture(autouse=True)
def _cpu_threads():
    # Two cores on CI: more threads than cores only adds contention.
    torch.set_num_threads(min(2, os.cpu_count() or 1))

"""Worker and producer unit tests run a real `WorkerLoop` on fakeredis (see harness.py)."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from harness import Harness  # noqa: E402


@pytest.fixture
def harness():
    h = Harness()
    yield h
    h.stop()

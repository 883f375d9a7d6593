"""The producer's unit tests share the worker tests' fakeredis harness."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "worker"))

from harness import Harness  # noqa: E402


@pytest.fixture
def harness():
    h = Harness()
    yield h
    h.stop()

"""`mii.pipeline` sets OMP_WAIT_POLICY=PASSIVE for the engine's OpenMP threads, as workers do,
before torch loads OpenMP; a value of the user's own wins; too late, it says so."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.timeout(60)


def run(code: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | env
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=environ, timeout=50)  # fmt: skip
    assert out.returncode == 0, out.stderr
    return out


def test_pipeline_sets_passive_before_torch_loads(tiny_model):
    code = (
        "import os, sys, mii\n"
        "assert 'torch' not in sys.modules\n"
        f"pipe = mii.pipeline({tiny_model('llama')!r})\n"
        "assert 'torch' in sys.modules\n"
        "print(os.environ['OMP_WAIT_POLICY'])"
    )
    assert run(code).stdout.split() == ["PASSIVE"]


def test_the_users_own_policy_wins():
    code = "import os; from mii.cpu_threads import prefer_passive_omp_wait as p; print(p())"
    assert run(code, OMP_WAIT_POLICY="ACTIVE").stdout.split() == ["False"]
    assert run(code).stdout.split() == ["True"]


def test_too_late_is_said_and_changes_nothing():
    code = (
        "import logging, os, torch; logging.basicConfig()\n"
        "from mii.cpu_threads import prefer_passive_omp_wait\n"
        "print(prefer_passive_omp_wait(), os.environ.get('OMP_WAIT_POLICY'))"
    )
    out = run(code, CUDA_VISIBLE_DEVICES="")
    assert out.stdout.split() == ["False", "None"]
    assert "torch was imported before mii.pipeline" in out.stderr

"""The step watchdog (mii/worker/watchdog.py): a step that outlives `step_timeout_s` ends
the process (here a stand-in for the exit), after the loop's report; steps within it, or
no timeout, never do."""

from __future__ import annotations

import threading
import time

import pytest

from mii.broker_config.settings import BrokerSettings
from mii.worker import watchdog as wd

pytestmark = pytest.mark.timeout(30)


def _watchdog(timeout_s, on_stuck=lambda elapsed: None):
    exited = threading.Event()
    dog = wd.StepWatchdog(timeout_s, on_stuck, exit_process=exited.set, poll_s=0.02)
    return dog, exited


def test_a_step_past_the_timeout_reports_then_ends_the_process():
    reports = []
    dog, exited = _watchdog(0.2, reports.append)
    dog.start()
    with dog.stepping():
        assert exited.wait(5), "the watchdog did not fire"
    assert len(reports) == 1 and 0.2 < reports[0] < 2


def test_steps_within_the_timeout_never_fire():
    dog, exited = _watchdog(0.3)
    dog.start()
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:  # idle gaps and short steps, longer than 0.3 s in all
        with dog.stepping():
            time.sleep(0.05)
        time.sleep(0.05)
    dog.stop()
    assert not exited.wait(0.3)


def test_a_report_that_never_returns_does_not_hold_the_exit_back(monkeypatch):
    monkeypatch.setattr(wd, "REPORT_WAIT_S", 0.2)
    dog, exited = _watchdog(0.1, lambda elapsed: threading.Event().wait())
    dog.start()
    with dog.stepping():
        assert exited.wait(5)


def test_no_timeout_starts_no_thread():
    dog, _ = _watchdog(None)
    dog.start()
    assert dog._thread is None


def test_the_setting_defaults_to_ten_minutes_and_takes_none():
    assert BrokerSettings().step_timeout_s == 600.0
    assert BrokerSettings(step_timeout_s=None).step_timeout_s is None
    with pytest.raises(ValueError):
        BrokerSettings(step_timeout_s=0)


def test_the_stacks_show_where_each_thread_is():
    stacks = wd.thread_stacks()
    assert "thread MainThread" in stacks and "test_the_stacks_show_where_each_thread_is" in stacks

"""Settings: URL resolution, redaction, limits that contradict each other."""

from __future__ import annotations

import pytest

from mii.broker_config.settings import BrokerSettings, explicit_redis_url, redact_url
from mii.config import MIIConfig

pytestmark = pytest.mark.timeout(5)


def test_url_from_argument_then_environment(monkeypatch):
    monkeypatch.setenv("MII_REDIS_URL", "redis://env:6379/0")
    assert explicit_redis_url("rediss://arg:6380/1") == "rediss://arg:6380/1"
    assert explicit_redis_url(None) == "redis://env:6379/0"
    monkeypatch.delenv("MII_REDIS_URL")
    assert explicit_redis_url(None) is None


def test_unknown_scheme_is_refused():
    with pytest.raises(ValueError, match="redis://, rediss://"):
        explicit_redis_url("http://localhost:6379")


def test_passwords_never_reach_logs():
    url = "rediss://alice:s3cret@redis.example:6380/2"
    assert redact_url(url) == "rediss://alice:***@redis.example:6380/2"
    assert redact_url("redis://localhost:6379") == "redis://localhost:6379"


def test_heartbeat_must_beat_the_reclaim_time():
    with pytest.raises(ValueError, match="heartbeat_interval_s"):
        BrokerSettings(heartbeat_interval_s=20, reclaim_idle_s=30)


def test_broker_settings_travel_in_mii_config():
    config = MIIConfig(model_config={"model_name_or_path": "m"}, broker={"max_queue_depth": 7})
    dumped = config.model_dump(mode="json", by_alias=True)
    assert MIIConfig.model_validate(dumped).broker.max_queue_depth == 7

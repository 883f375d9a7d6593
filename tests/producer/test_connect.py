"""`mii.client(name)` says what went wrong (issue 12, item 8): credentials refused, no
Redis answering, or a Redis without the deployment; never a password in the message."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time

import pytest
import redis as redis_py
from harness import Harness

import mii
from mii.broker_config.deployment import DeploymentRecord, save_record
from mii.broker_config.keys import DeploymentKeys
from mii.errors import BrokerUnavailableError, DeploymentNotFoundError
from mii.launch.embedded_redis import free_port

pytestmark = [
    pytest.mark.redis,
    pytest.mark.timeout(30),
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server"),
]
PASSWORD = "s3cret-pw"


@pytest.fixture(scope="module")
def locked_redis():
    """A private redis-server with a password and one deployment recorded."""
    port = free_port()
    cmd = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    cmd += ["--appendonly", "no", "--requirepass", PASSWORD, "--dir", tempfile.mkdtemp()]
    process = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, start_new_session=True)
    url = f"redis://:{PASSWORD}@127.0.0.1:{port}/0"
    client = redis_py.Redis.from_url(url)
    deadline = time.monotonic() + 10
    while True:
        try:
            client.ping()
            break
        except redis_py.ConnectionError:
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.05)
    config = Harness(deployment="locked-dep").mii_config
    record = DeploymentRecord(mii_config=config.model_dump(mode="json", by_alias=True))
    save_record(client, DeploymentKeys("locked-dep"), record)
    yield port
    process.terminate()
    process.wait(10)


@pytest.fixture(autouse=True)
def _no_env_url(monkeypatch):
    monkeypatch.delenv("MII_REDIS_URL", raising=False)


def test_the_right_password_connects(locked_redis):
    client = mii.client("locked-dep", redis_url=f"redis://:{PASSWORD}@127.0.0.1:{locked_redis}")
    assert client.deployment_name == "locked-dep"
    client.close()


@pytest.mark.parametrize(
    ("auth", "message"),
    [
        (":wrong@", "refused the credentials"),
        ("bob:wrong@", "refused the credentials"),
        ("", "wants a password and the URL gives none"),
    ],
)
def test_refused_credentials_say_so(locked_redis, auth, message):
    url = f"redis://{auth}127.0.0.1:{locked_redis}/0"
    with pytest.raises(BrokerUnavailableError, match=message) as caught:
        mii.client("locked-dep", redis_url=url)
    assert "wrong" not in str(caught.value)


def test_no_redis_answering_says_so_without_the_password():
    url = f"redis://:{PASSWORD}@127.0.0.1:{free_port()}/0"
    with pytest.raises(BrokerUnavailableError, match="no Redis answers at redis://:\\*\\*\\*@"):
        mii.client("any-dep", redis_url=url)
    with pytest.raises(BrokerUnavailableError) as caught:
        mii.client("any-dep", redis_url=url)
    assert PASSWORD not in str(caught.value)


def test_only_a_reachable_redis_without_the_record_is_not_found(locked_redis):
    url = f"redis://:{PASSWORD}@127.0.0.1:{locked_redis}/0"
    with pytest.raises(DeploymentNotFoundError, match="no deployment named 'other-dep'") as e:
        mii.client("other-dep", redis_url=url)
    assert PASSWORD not in str(e.value)


def test_a_bad_url_scheme_shows_no_password():
    with pytest.raises(ValueError, match="must start with redis://") as caught:
        mii.client("dep", redis_url=f"http://user:{PASSWORD}@example.com")
    assert PASSWORD not in str(caught.value)

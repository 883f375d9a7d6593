"""Key names: one module, one hash tag per deployment."""

from __future__ import annotations

import pytest

from mii.broker_config.keys import DeploymentKeys

pytestmark = pytest.mark.timeout(5)


def _hash_tag(key: str) -> str:
    return key[key.index("{") + 1 : key.index("}")]


def test_every_key_carries_the_deployment_hash_tag():
    keys = DeploymentKeys("smollm2-mii-deployment")
    names = [keys.requests, keys.bulk, keys.deadletter, keys.control, keys.config, keys.workers]
    names += [keys.response("abc"), keys.cancelled("abc")]
    names += [keys.file("file-1"), keys.batch("batch_1"), keys.batches]
    assert {_hash_tag(n) for n in names} == {"smollm2-mii-deployment"}
    assert len(set(names)) == len(names)
    assert keys.requests == "mii:{smollm2-mii-deployment}:requests"
    assert keys.response("r1") == "mii:{smollm2-mii-deployment}:resp:r1"


@pytest.mark.parametrize("bad", ["", "a{b}", "has space", "x" * 201])
def test_names_that_would_break_keys_are_refused(bad):
    with pytest.raises(ValueError, match="deployment name"):
        DeploymentKeys(bad)


def test_job_keys_share_the_deployment_hash_tag_and_name_their_requests():
    keys = DeploymentKeys("dep")
    job = keys.job("job-1")
    assert {_hash_tag(k) for k in job.all()} == {"dep"} and len(set(job.all())) == 4
    assert job.meta == "mii:{dep}:job:job-1:meta"
    assert job.rid(12) == "job-1-12"
    assert len(keys.job("j" * 48).rid(10**9)) <= 64  # fits the wire's request id


@pytest.mark.parametrize("bad", ["", "a b", "a{b}", "x" * 49, "a.b"])
def test_job_ids_that_would_break_keys_or_request_ids_are_refused(bad):
    with pytest.raises(ValueError, match="job id"):
        DeploymentKeys("dep").job(bad)

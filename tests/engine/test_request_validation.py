"""Every id-valued option the engine indexes with is checked against the vocabulary
before the engine takes the request (an out-of-range stop token id once crashed a step)."""

from __future__ import annotations

import pytest

import mii
from mii.errors import InvalidRequestError

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def pipe(tiny_model):
    return mii.pipeline(tiny_model("llama"), max_num_batched_tokens=64)


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"stop_token_ids": [10**6], "min_new_tokens": 2}, "stop_token_ids"),
        ({"stop_token_ids": [10**6]}, "stop_token_ids"),
        ({"logit_bias": {"1000000": 5.0}}, "logit_bias"),
    ],
)
def test_out_of_vocabulary_ids_are_refused_and_the_engine_goes_on(pipe, options, field):
    with pytest.raises(InvalidRequestError, match=f"{field}.*outside the vocabulary"):
        pipe("Hello", max_new_tokens=4, **options)
    assert not pipe.engine.has_unfinished_requests()
    assert pipe("Hello", max_new_tokens=4, min_new_tokens=2)[0].generated_length >= 2


def test_out_of_vocabulary_prompt_ids_name_the_prompt(pipe):
    with pytest.raises(InvalidRequestError, match="prompt.*outside the vocabulary"):
        pipe([[1, 2, 10**6]], max_new_tokens=2)

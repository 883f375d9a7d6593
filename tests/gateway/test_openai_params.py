"""OpenAI request options -> MII's generation options (no I/O)."""

from __future__ import annotations

import pytest

from mii.producer.openai_params import CHAT, COMPLETIONS, OpenAIParamError, mii_options

pytestmark = pytest.mark.timeout(10)


def test_defaults_sample_like_openai_and_zero_temperature_is_greedy():
    assert mii_options({"prompt": "x"}, COMPLETIONS) == {
        "do_sample": True, "temperature": 1.0, "top_p": 1.0}  # fmt: skip
    assert mii_options({"temperature": 0, "top_p": None}, COMPLETIONS) == {"do_sample": False}


def test_names_map_and_vllm_extensions_pass():
    body = {"max_tokens": 5, "min_tokens": 2, "top_k": 4, "stop": "\n", "seed": 3,
            "presence_penalty": 0.5, "frequency_penalty": -0.5, "logit_bias": {"7": -100},
            "ignore_eos": True, "stop_token_ids": [2], "user": "u", "temperature": 0.7}  # fmt: skip
    options = mii_options(body, COMPLETIONS)
    assert options["max_new_tokens"] == 5 and options["min_new_tokens"] == 2
    assert options["temperature"] == 0.7 and options["logit_bias"] == {"7": -100}
    assert "user" not in options


def test_logprobs_forms_per_endpoint():
    assert mii_options({"logprobs": 3}, COMPLETIONS)["logprobs"] == 3
    assert mii_options({"logprobs": True, "top_logprobs": 2}, CHAT)["logprobs"] == 2
    assert mii_options({"logprobs": True}, CHAT)["logprobs"] == 0
    assert "logprobs" not in mii_options({"logprobs": False}, CHAT)
    assert mii_options({"max_completion_tokens": 9}, CHAT)["max_new_tokens"] == 9


@pytest.mark.parametrize(
    ("body", "endpoint", "param"),
    [
        ({"tools": []}, CHAT, "tools"),
        ({"echo": True}, CHAT, "echo"),
        ({"top_logprobs": 2}, CHAT, "top_logprobs"),
        ({"logprobs": 21}, COMPLETIONS, "logprobs"),
        ({"temperature": "hot"}, COMPLETIONS, "temperature"),
        ({"top_p": 0}, COMPLETIONS, "top_p"),
        ({"presence_penalty": 3}, COMPLETIONS, "presence_penalty"),
        ({"max_tokens": -1}, COMPLETIONS, "max_tokens"),
    ],
)
def test_a_bad_option_is_named_as_the_caller_wrote_it(body, endpoint, param):
    with pytest.raises(OpenAIParamError) as info:
        mii_options(body, endpoint)
    assert info.value.param == param

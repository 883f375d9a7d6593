"""`GenerateParams` and prompt checks: strict, bounded, finite; one clear error each."""

from __future__ import annotations

import pytest

from mii.errors import InvalidRequestError
from mii.params import MAX_INT32, GenerateParams, as_prompt_list, check_prompt

pytestmark = pytest.mark.timeout(10)


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"max_new_tokens": 10**30}, "max_new_tokens"),
        ({"max_length": 2**31}, "max_length"),
        ({"min_new_tokens": 2**40}, "min_new_tokens"),
        ({"top_k": 2**63}, "top_k"),
        ({"stop_token_ids": [2**70]}, "stop_token_ids"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"seed": 2**63}, "seed"),
        ({"stop": "abc\udcff"}, "stop"),
        ({"stop": ["ok", "\ud800"]}, "stop"),
        ({"max_new_tokens": "10"}, "max_new_tokens"),
        ({"max_new_tokens": 10.0}, "max_new_tokens"),
        ({"do_sample": "yes"}, "do_sample"),
        ({"do_sample": 1}, "do_sample"),
        ({"ignore_eos": "false"}, "ignore_eos"),
        ({"temperature": "0.5"}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": -0.1}, "temperature"),
        ({"top_p": float("nan")}, "top_p"),
        ({"min_p": float("nan")}, "min_p"),
        ({"repetition_penalty": float("inf")}, "repetition_penalty"),
        ({"top_k": True}, "top_k"),
    ],
)
def test_bad_options_are_one_error_naming_the_field(options, field):
    with pytest.raises(InvalidRequestError, match=field) as caught:
        GenerateParams.from_kwargs(**options)
    assert "Value error," not in str(caught.value)


def test_ints_are_fine_for_float_fields_and_counts_up_to_int32():
    params = GenerateParams.from_kwargs(
        top_p=1, temperature=2, repetition_penalty=1, max_new_tokens=MAX_INT32,
        stop_token_ids=[MAX_INT32], seed=2**63 - 1,
    )  # fmt: skip
    assert params.top_p == 1.0 and isinstance(params.temperature, float)


@pytest.mark.parametrize("do_sample", [True, False])
def test_temperature_zero_means_greedy_as_in_mii_and_openai(do_sample):
    params = GenerateParams.from_kwargs(temperature=0, do_sample=do_sample, top_k=5)
    sampling = params.to_sampling_params(prompt_length=3, max_model_len=100)
    assert params.greedy and sampling.greedy
    assert (sampling.top_k, sampling.top_p) == (None, 1.0)


@pytest.mark.parametrize(
    ("prompts", "message"),
    [
        (None, "a prompt is a string or a list of token ids.*not NoneType None"),
        (123, "a prompt is a string or a list of token ids.*not int 123"),
        (b"bytes", "not bytes b'bytes'; decode bytes to str first"),
        ([], "no prompts given"),
        ("", "prompt is empty"),
        (["ok", ""], r"prompt is empty \(prompts\[1\]\)"),
        (["ok", None], r"not NoneType None \(prompts\[1\]\)"),
        ("abc\udcff", "prompt is not valid Unicode text.*'\\\\udcff' at character 3"),
        ([1, 2**70], "token id 1180591620717411303424 at position 1"),
        ([[1], [2, -1]], r"prompt \(prompts\[1\]\): token id -1"),
        ([[1, True]], "token id True"),
    ],
)
def test_bad_prompts_say_what_a_prompt_must_be(prompts, message):
    with pytest.raises(InvalidRequestError, match=message):
        as_prompt_list(prompts)


def test_good_prompts_pass_as_lists():
    assert as_prompt_list("hi") == ["hi"]
    assert as_prompt_list((1, 2)) == [[1, 2]]
    assert as_prompt_list(["a", [3]]) == ["a", [3]]
    assert check_prompt([0, MAX_INT32]) == [0, MAX_INT32]

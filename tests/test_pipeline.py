"""`mii.pipeline`: MII's API, options, streaming, and clear errors that leave it working."""

from __future__ import annotations

import pytest

import mii
from mii.errors import InvalidRequestError


@pytest.fixture(scope="module")
def pipe(tiny_model):
    return mii.pipeline(tiny_model("llama"), max_num_batched_tokens=64)


def test_returns_one_response_per_prompt_with_mii_fields(pipe):
    out = pipe(["hello", "a longer prompt here"], max_new_tokens=5, do_sample=False)
    assert len(out) == 2
    for r, prompt in zip(out, ["hello", "a longer prompt here"], strict=True):
        assert isinstance(r, mii.Response)
        assert r.prompt_length == len(pipe.tokenizer.encode(prompt))
        assert r.generated_length == len(r.token_ids) <= 5
        assert r.finish_reason in (
            mii.GenerationFinishReason.LENGTH,
            mii.GenerationFinishReason.STOP,
        )
        assert str(r) == r.generated_text


def test_text_and_token_id_prompts_agree(pipe):
    ids = pipe.tokenizer.encode("same prompt")
    a = pipe("same prompt", max_new_tokens=6, do_sample=False)[0]
    b = pipe(ids, max_new_tokens=6, do_sample=False)[0]
    assert a.token_ids == b.token_ids and a.generated_text == b.generated_text


def test_stream_yields_deltas_that_join_to_the_blocking_text(pipe):
    blocking = pipe("stream me", max_new_tokens=12, min_new_tokens=12, do_sample=False)[0]
    deltas = list(pipe.stream("stream me", max_new_tokens=12, min_new_tokens=12, do_sample=False))
    assert "".join(d.generated_text for d in deltas) == blocking.generated_text
    assert [t for d in deltas for t in d.token_ids] == blocking.token_ids
    assert deltas[-1].finish_reason == mii.GenerationFinishReason.LENGTH


def test_same_seed_same_text_and_sampling_is_the_default(pipe):
    a = pipe("seeded", max_new_tokens=10, seed=5)[0]
    b = pipe(["other", "seeded"], max_new_tokens=10, seed=5)[1]
    assert a.token_ids == b.token_ids
    many = {tuple(pipe("unseeded", max_new_tokens=10)[0].token_ids) for _ in range(4)}
    assert len(many) > 1  # MII's default is do_sample=True


def test_return_full_text_prepends_the_prompt(pipe):
    r = pipe("prefix: ", max_new_tokens=4, do_sample=False, return_full_text=True)[0]
    assert r.generated_text.startswith("prefix: ")


def test_max_length_caps_prompt_plus_generation(pipe):
    r = pipe([5] * 10, max_length=14, max_new_tokens=50, min_new_tokens=4, do_sample=False)[0]
    assert r.generated_length == 4 and r.finish_reason == mii.GenerationFinishReason.LENGTH


def test_ignore_eos_runs_to_max_new_tokens(pipe):
    r = pipe("x", max_new_tokens=30, ignore_eos=True, temperature=3.0, seed=1)[0]
    assert r.generated_length == 30


def test_stop_string_ends_generation_and_is_cut(pipe):
    full = pipe("abc", max_new_tokens=20, min_new_tokens=20, do_sample=False)[0].generated_text
    stop = full[3:5]
    cut = pipe("abc", max_new_tokens=20, do_sample=False, stop=stop)[0]
    assert cut.generated_text == full[: full.index(stop)]
    assert cut.finish_reason == mii.GenerationFinishReason.STOP


@pytest.mark.parametrize(
    ("prompts", "options", "message"),
    [
        ([], {}, "no prompts"),
        ([""], {}, "prompt is empty"),
        (["ok", ""], {}, "prompt is empty"),
        (["x" * 2000], {"max_length": 4096}, "context is 1024 tokens"),
        (["ok"], {"bogus_option": 1}, "unknown generation option.*bogus_option"),
        (["ok"], {"max_new_tokens": -1}, "max_new_tokens"),
        (["ok"], {"top_p": 0.0}, "top_p"),
        (["ok"], {"top_p": 1.5}, "top_p"),
        (["ok"], {"temperature": -1}, "temperature"),
        ([[1, 2, 99999]], {}, "outside the vocabulary"),
        ([3.5], {}, "a prompt is a string or a list of token ids"),
        (None, {}, "a prompt is a string or a list of token ids.*not NoneType"),
        (b"hi", {}, "decode bytes to str"),
        (["abc\udcff"], {}, "not valid Unicode"),
        ([[1, 2**70]], {}, "token id"),
        (["ok"], {"max_new_tokens": 10**30}, "max_new_tokens"),
        (["ok"], {"do_sample": "yes"}, "do_sample"),
        (["ok"], {"temperature": float("inf")}, "temperature"),
    ],
)
def test_bad_input_is_a_clear_error_and_the_pipeline_keeps_working(pipe, prompts, options, message):
    with pytest.raises(InvalidRequestError, match=message):
        pipe(prompts, **options)
    assert not pipe.engine.has_unfinished_requests()
    assert pipe("still fine", max_new_tokens=2)[0].generated_length >= 1


def test_temperature_zero_is_greedy_even_when_sampling(pipe):
    greedy = pipe("cold", max_new_tokens=6, do_sample=False)[0]
    zero = pipe("cold", max_new_tokens=6, do_sample=True, temperature=0)[0]
    assert zero.token_ids == greedy.token_ids


def test_unknown_pipeline_option_names_it(tiny_model):
    with pytest.raises(Exception, match="no_such_option"):
        mii.pipeline(tiny_model("llama"), no_such_option=3)


def test_model_config_dict_and_kwargs_are_accepted(tiny_model):
    p = mii.pipeline(model_config={"model_name_or_path": tiny_model("opt"), "max_length": 128})
    assert p.engine.max_model_len == 128
    assert p("hi", max_new_tokens=2)[0].generated_length >= 1


def test_destroy_releases_the_engine(tiny_model):
    p = mii.pipeline(tiny_model("opt"))
    p.destroy()
    assert p.engine is None

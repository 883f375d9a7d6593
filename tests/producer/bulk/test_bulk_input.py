"""Bulk job input lines: mii's form, OpenAI's batch form, and line-by-line errors."""

from __future__ import annotations

import json

import pytest

from mii.producer.bulk.input import CHAT, COMPLETIONS, BulkLine, LineError, read_lines


def parse(*objs) -> list:
    return list(read_lines(o if isinstance(o, str) else json.dumps(o) for o in objs))


def test_mii_lines_with_ids_params_and_chat():
    got = parse(
        {"prompt": "hello", "id": "a", "params": {"max_new_tokens": 5, "do_sample": False}},
        {"prompt": [1, 2, 3]},
        {"messages": [{"role": "user", "content": "hi"}]},
    )
    assert got[0] == BulkLine(0, "a", "hello", None, {"max_new_tokens": 5, "do_sample": False})
    assert got[1].id == "1" and got[1].prompt == [1, 2, 3]
    assert got[2].messages == [{"role": "user", "content": "hi"}] and got[2].prompt is None


def test_openai_completion_and_chat_bodies_map_to_mii_options():
    comp = {
        "custom_id": "c1",
        "method": "POST",
        "url": COMPLETIONS,
        "body": {"model": "m", "prompt": "2+2=", "max_tokens": 8, "temperature": 0},
    }
    chat = {
        "custom_id": "c2",
        "method": "POST",
        "url": CHAT,
        "body": {
            "model": "m",
            "messages": [{"role": "user", "content": "hi"}],
            "max_completion_tokens": 4,
            "temperature": 0.5,
            "stop": ["\n"],
        },
    }
    a, b = parse(comp, chat)
    assert a.id == "c1" and a.prompt == "2+2=" and a.openai_url == COMPLETIONS
    assert a.params == {"max_new_tokens": 8, "do_sample": False}
    assert b.messages and b.params == {
        "do_sample": True,
        "max_new_tokens": 4,
        "temperature": 0.5,
        "stop": ["\n"],
        "top_p": 1.0,
    }


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", "not JSON"),
        ("[1, 2]", "JSON object"),
        ({"id": "x"}, "exactly one of prompt or messages"),
        ({"prompt": ""}, "non-empty"),
        ({"prompt": "x", "params": {"top_p": 7}}, "top_p"),
        ({"prompt": "x", "params": {"bogus": 1}}, "bogus"),
        ({"prompt": "x", "extra": 1}, "unknown field"),
        ({"url": "/v1/embeddings", "body": {}}, "url"),
        ({"url": COMPLETIONS, "body": {"prompt": "x", "n": 3}}, "n > 1"),
        ({"url": COMPLETIONS, "body": {"prompt": "x", "tools": [{}]}}, "tools"),
        ({"messages": [{"content": "no role"}]}, "role"),
        ('{"prompt": "abc\\udcff"}', "not valid Unicode"),
        ({"prompt": [1, 2**70]}, "token id"),
        ({"prompt": "x", "params": {"max_new_tokens": 10**30}}, "max_new_tokens"),
        ({"prompt": "x", "params": {"do_sample": "yes"}}, "do_sample"),
        ('{"messages": [{"role": "user", "content": "\\ud800"}]}', "not valid Unicode"),
        ('{"prompt": "x", "id": "\\udcff"}', "the line's id is not valid Unicode"),
    ],
)
def test_a_bad_line_is_an_error_for_that_line_only(line, message):
    got = parse({"prompt": "fine"}, line, {"prompt": "also fine"})
    assert isinstance(got[0], BulkLine) and isinstance(got[2], BulkLine)
    assert isinstance(got[1], LineError) and got[1].line == 1
    assert message in got[1].error


def test_blank_lines_are_skipped_but_keep_numbering():
    got = list(read_lines(['{"prompt": "a"}', "", '{"prompt": "b"}']))
    assert [g.line for g in got] == [0, 2]

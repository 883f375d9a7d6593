"""Incremental detokenization: UTF-8 safe deltas, stop strings across tokens, resume."""

from __future__ import annotations

import pytest
from tiny_models import byte_tokenizer

from mii.engine.detokenizer import IncrementalDetokenizer

TEXTS = ["héllo wörld", "日本語のテキスト", "emoji 🎉🚀 done", "plain ascii text"]


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def stream(detok: IncrementalDetokenizer, ids: list[int]) -> list[str]:
    deltas = []
    for i, t in enumerate(ids):
        detok.add_token(t)
        deltas.append(detok.take(finished=i == len(ids) - 1))
    return deltas


@pytest.mark.parametrize("text", TEXTS)
def test_deltas_are_whole_characters_and_join_to_the_full_decode(tok, text):
    ids = tok.encode(text)
    deltas = stream(IncrementalDetokenizer(tok), ids)
    assert "".join(deltas) == tok.decode(ids) == text
    assert all("\ufffd" not in d for d in deltas)
    assert len(ids) > len(text) or text.isascii()  # multi-byte characters span tokens


def test_smollm2_tokenizer_deltas_match_full_decode(smollm2_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_path)
    text = " The naïve café served crème brûlée — 東京 🎉 and spaces  twice."
    ids = tok.encode(text)
    assert "".join(stream(IncrementalDetokenizer(tok), ids)) == tok.decode(ids)


def test_stop_string_spanning_tokens_is_cut_and_never_leaks(tok):
    ids = tok.encode("abc STOP def")
    detok = IncrementalDetokenizer(tok, stop=("STOP",))
    released = []
    for t in ids:
        detok.add_token(t)
        released.append(detok.take(finished=detok.stopped))
        if detok.stopped:
            break
    assert "".join(released) == "abc "
    assert detok.stopped
    assert all("S" not in r for r in released)


def test_held_back_tail_is_released_when_it_cannot_be_a_stop(tok):
    detok = IncrementalDetokenizer(tok, stop=("xyz",))
    out = stream(detok, tok.encode("axyb"))
    assert "".join(out) == "axyb" and not detok.stopped
    assert out[1] == ""  # "x" might have started "xyz"


def test_earliest_of_several_stop_strings_wins(tok):
    detok = IncrementalDetokenizer(tok, stop=("cd", "bcde"))
    stream(detok, tok.encode("abcdef"))
    assert detok.text == "ab"


def test_resumed_detokenizer_continues_without_repeating(tok):
    ids = tok.encode("héllo wörld, again")
    whole = stream(IncrementalDetokenizer(tok), ids)
    cut = 7  # inside "wörld"'s two-byte "ö" would be 8; 7 is after "héllo "
    resumed = IncrementalDetokenizer(tok, generated_token_ids=ids[:cut])
    rest = stream(resumed, ids[cut:])
    assert "".join(whole[:cut]) + "".join(rest) == "".join(whole)


def test_incomplete_character_at_the_end_is_flushed_as_replacement(tok):
    ids = tok.encode("é")[:1]  # half of a two-byte character
    assert stream(IncrementalDetokenizer(tok), ids) == ["\ufffd"]

"""Log-probabilities in OpenAI's two forms, from a `Response` (or a streamed delta) that
carries `logprobs`, `tokens` and `top_logprobs`: the gateway's answers and the OpenAI
lines of a bulk job's output (`producer.bulk.output`).

Completions: `{"tokens", "token_logprobs", "top_logprobs": [{text: logprob}], "text_offset"}`.
Chat: `{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob",
"bytes"}]}]}`. A token whose text did not travel (a deployment without a tokenizer) shows
as `token_id:<id>`, as vLLM writes it.
"""

from __future__ import annotations

from mii.response import Response


def _token_texts(response: Response) -> list[str]:
    if response.tokens is not None and len(response.tokens) == len(response.token_ids):
        return response.tokens
    return [f"token_id:{t}" for t in response.token_ids]


def _alternatives(response: Response, k: int) -> list[list[tuple[int, float, str]]]:
    """The best `k` alternatives of each token (a batch may have computed more)."""
    top = response.top_logprobs or []
    if len(top) != len(response.token_ids):
        top = [[] for _ in response.token_ids]
    return [[tuple(alt) for alt in alts[:k]] for alts in top]


def completion_logprobs(response: Response, k: int, offset: int = 0) -> dict:
    """Completions' form; `offset`: characters of text before this piece."""
    tokens = _token_texts(response)
    offsets, at = [], offset
    for text in tokens:
        offsets.append(at)
        at += len(text)
    top = [{text: lp for _, lp, text in alts} for alts in _alternatives(response, k)]
    return {
        "tokens": tokens,
        "token_logprobs": list(response.logprobs or []),
        "top_logprobs": top if k else None,
        "text_offset": offsets,
    }


def chat_logprobs(response: Response, k: int) -> dict:
    tokens, alternatives = _token_texts(response), _alternatives(response, k)
    content = [
        _chat_token(text, lp) | {"top_logprobs": [_chat_token(t, v) for _, v, t in alts]}
        for text, lp, alts in zip(tokens, response.logprobs or [], alternatives, strict=False)
    ]
    return {"content": content}


def _chat_token(text: str, logprob: float) -> dict:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

"""Building request entries and adding them to a stream under the queue-depth limit.

A batch of prompts goes in with one Lua script call: the depth check and the XADDs are
atomic, so concurrent clients never push the stream past its limit, and a refused batch
leaves nothing behind. The script touches one key, so it is Redis Cluster safe.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import redis

from mii.broker_config import wire
from mii.broker_config.keys import process_name
from mii.broker_config.wire import RequestMessage
from mii.errors import InvalidRequestError, QueueFullError
from mii.params import GenerateParams
from mii.producer.request_set import RequestSet

MAX_CHOICES = 128  # most completions `n=` asks for one prompt


@dataclass(frozen=True)
class Chat:
    """A conversation as a prompt: `client.generate(Chat([{"role": "user", "content":
    "Hi"}]))`. The worker applies the model's chat template, so the client needs no model
    files."""

    messages: list[dict[str, Any]]


Prompt = str | list[int] | Chat

SUBMIT_SCRIPT = """
local n = (#ARGV - 1) / 2
local limit = tonumber(ARGV[1])
local depth = redis.call('XLEN', KEYS[1])
if limit > 0 and depth + n > limit then
  return redis.error_reply('QUEUEFULL ' .. depth)
end
local ids = {}
for i = 0, n - 1 do
  ids[i + 1] = redis.call('XADD', KEYS[1], '*', 'rid', ARGV[2 + 2 * i], 'm', ARGV[3 + 2 * i])
end
return ids
"""


def as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    """One prompt (text, token ids or a `Chat`) or a list of them, as a checked list."""
    if isinstance(prompts, str | Chat) or (
        isinstance(prompts, list | tuple) and prompts and isinstance(prompts[0], int)
    ):
        prompts = [prompts]
    if not isinstance(prompts, list | tuple) or not prompts:
        raise InvalidRequestError("no prompts given")
    return [_check_prompt(p) for p in prompts]


def _check_prompt(prompt) -> Prompt:
    if isinstance(prompt, str) and prompt:
        return prompt
    if isinstance(prompt, Chat):
        return _check_chat(prompt)
    ints = isinstance(prompt, list | tuple) and prompt
    if ints and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt):
        return list(prompt)
    raise InvalidRequestError(
        f"a prompt is a non-empty string or list of token ids, not {prompt!r:.80}"
    )


def _check_chat(chat: Chat) -> Chat:
    messages = chat.messages
    if not isinstance(messages, list | tuple) or not messages:
        raise InvalidRequestError("a chat needs a non-empty list of messages")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            raise InvalidRequestError("each chat message is an object with a role and a content")
    return Chat(list(messages))


def build_requests(
    prompts: list[Prompt], params: GenerateParams, timeout_s: float | None, n: int = 1
) -> list[RequestMessage]:
    """`n` messages per prompt (prompt-major), each with a fresh id and, when sampling, its
    own seed: a worker that takes over a request continues the same random stream. With a
    `seed`, choice c of a prompt samples with seed + c, so the n choices differ."""
    if timeout_s is not None and timeout_s <= 0:
        raise InvalidRequestError(f"timeout must be positive, got {timeout_s}")
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_CHOICES:
        raise InvalidRequestError(f"n must be an integer from 1 to {MAX_CHOICES}, got {n!r}")
    options = params.model_dump(exclude_defaults=True)
    return [
        _message(prompt, _choice_options(options, params, choice), timeout_s)
        for prompt in prompts
        for choice in range(n)
    ]


def _choice_options(options: dict, params: GenerateParams, choice: int) -> dict:
    fields = dict(options)
    if params.seed is not None and choice:
        fields["seed"] = (params.seed + choice) % 2**63
    elif params.do_sample and params.seed is None:
        fields["seed"] = random.getrandbits(63)
    return fields


def _message(prompt: Prompt, params: dict, timeout_s: float | None) -> RequestMessage:
    chat = isinstance(prompt, Chat)
    return RequestMessage(
        rid=uuid.uuid4().hex,
        prompt="" if chat else prompt,
        messages=prompt.messages if chat else None,
        params=params,
        timeout_s=timeout_s,
        client=process_name(),
    )


@dataclass
class Submission:
    """Validated requests bound for one stream under its depth limit."""

    requests: RequestSet
    stream: str
    max_depth: int | None

    def script_args(self) -> list:
        args: list = [self.max_depth or 0]
        for request in self.requests.requests:
            fields = wire.request_fields(request.message)
            args += [fields[wire.RID], fields[wire.PAYLOAD]]
        return args

    def refusal(self, exc: redis.ResponseError) -> Exception:
        """The clear error for a refused batch (or the Redis error if it is another one)."""
        text = str(exc)
        if not text.startswith("QUEUEFULL"):
            return exc
        depth = text.split()[1] if len(text.split()) > 1 else "?"
        n = len(self.requests.requests)
        return QueueFullError(
            f"queue {self.stream} holds {depth} requests; adding {n} would pass its limit "
            f"of {self.max_depth} (broker.max_queue_depth): retry later or add workers"
        )

"""Building request entries and adding them to a stream under the queue-depth limit.

A batch of prompts goes in with one Lua script call: the deployment-state check, the depth
check, the client's liveness key and the XADDs are atomic, so concurrent clients never push
the stream past its limit, a failed deployment queues nothing, and a refused batch leaves
nothing behind. Every key the script touches is in one slot, so it is Redis Cluster safe:
with several partitions (`broker.partitions`), the call's requests go to the partition of
its reply stream, their ids drawn there, and the state check and the liveness key (under
the deployment's own tag) go in a pipeline before the script instead of inside it.
"""

from __future__ import annotations

import enum
import json
import math
import numbers
import random
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from mii.broker_config import wire
from mii.broker_config.connection import as_text
from mii.broker_config.deployment import FAILED
from mii.broker_config.keys import DeploymentKeys, process_name, slot
from mii.broker_config.settings import REQUEST_BYTES_PER_TOKEN
from mii.broker_config.wire import RequestMessage
from mii.errors import DeploymentFailedError, InvalidRequestError, QueueFullError
from mii.params import GenerateParams, check_prompt
from mii.params import as_prompt_list as params_prompt_list
from mii.producer.request_set import RequestSet

MAX_CHOICES = 128  # most completions `n=` asks for one prompt
TOKEN_ID_BYTES = 4  # what a token id counts against the byte limit


@dataclass(frozen=True)
class Chat:
    """A conversation as a prompt: `client.generate(Chat([{"role": "user", "content":
    "Hi"}]))`. The worker applies the model's chat template, so the client needs no model
    files."""

    messages: list[dict[str, Any]]


Prompt = str | list[int] | Chat

SUBMIT_SCRIPT = """
-- KEYS: request stream, [deployment state, [client liveness key]]
-- ARGV: depth limit (0: none), the failed state's name, liveness TTL, then rid, payload...
if #KEYS > 1 then
  local state = redis.call('HMGET', KEYS[2], 'state', 'error')
  if state[1] == ARGV[2] then
    local why = string.gsub(tostring(state[2] or ''), '[\\r\\n]', ' ')
    return redis.error_reply('DEPLOYMENTFAILED ' .. why)
  end
end
local n = (#ARGV - 3) / 2
local limit = tonumber(ARGV[1])
local depth = redis.call('XLEN', KEYS[1])
if limit > 0 and depth + n > limit then
  return redis.error_reply('QUEUEFULL ' .. depth)
end
if #KEYS > 2 then
  redis.call('SET', KEYS[3], '1', 'EX', ARGV[3])
end
local ids = {}
for i = 0, n - 1 do
  ids[i + 1] = redis.call('XADD', KEYS[1], '*', 'rid', ARGV[4 + 2 * i], 'm', ARGV[5 + 2 * i])
end
return ids
"""


class Timeout(enum.Enum):
    DEFAULT = "default"
    """No `timeout=` given: the deployment's `broker.request_timeout_s` applies."""


def request_timeout(value, default_s: float | None) -> float | None:
    """A call's `timeout=` in seconds: positive and finite, None for no deadline, or
    `Timeout.DEFAULT` (not given) for `default_s`."""
    if value is Timeout.DEFAULT:
        return default_s
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidRequestError(
            f"timeout must be a number of seconds or None (no deadline), got {value!r:.80}"
        )
    if not math.isfinite(value) or value <= 0:
        raise InvalidRequestError(
            f"timeout must be a positive, finite number of seconds or None (no deadline), "
            f"got {value!r}"
        )
    return float(value)


def as_prompt_list(prompts) -> list[Prompt]:
    """`mii.params.as_prompt_list`, with `Chat` prompts as well."""
    if isinstance(prompts, Chat):
        return [_check_chat(prompts)]
    if isinstance(prompts, list | tuple) and any(isinstance(p, Chat) for p in prompts):
        return [_check_chat(p) if isinstance(p, Chat) else check_prompt(p, i)
                for i, p in enumerate(prompts)]  # fmt: skip
    return params_prompt_list(prompts)


def check_prompt_size(prompt: Prompt, limit: int, index: int | None = None) -> None:
    """Refuse a prompt over the deployment's byte limit (UTF-8 bytes, or 4 per token id)
    before it is queued: a client cannot count tokens without the model's tokenizer."""
    size = _prompt_bytes(prompt)
    if size > limit:
        where = "" if index is None else f" (prompts[{index}])"
        raise InvalidRequestError(
            f"prompt{where} is {size:,} bytes, over this deployment's limit of {limit:,} bytes "
            f"per request (setting broker.max_request_bytes; unset, it is "
            f"{REQUEST_BYTES_PER_TOKEN} bytes per token of the model's max_length, at least "
            "1 MiB)"
        )


def _prompt_bytes(prompt: Prompt) -> int:
    if isinstance(prompt, Chat):
        return len(json.dumps(prompt.messages, ensure_ascii=False).encode())
    return len(prompt.encode()) if isinstance(prompt, str) else TOKEN_ID_BYTES * len(prompt)


def _check_chat(chat: Chat) -> Chat:
    messages = chat.messages
    if not isinstance(messages, list | tuple) or not messages:
        raise InvalidRequestError("a chat needs a non-empty list of messages")
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
            raise InvalidRequestError("each chat message is an object with a role and a content")
    return Chat(list(messages))


def build_requests(
    prompts: list[Prompt],
    params: GenerateParams,
    timeout_s: float | None,
    n: int = 1,
    reply: str | None = None,
    new_rid: Callable[[], str] | None = None,
) -> list[RequestMessage]:
    """`n` messages per prompt (prompt-major), each with a fresh id (`new_rid()`, by
    default a random one) and, when sampling, its own seed: a worker that takes over a
    request continues the same random stream. With a `seed`, choice c of a prompt samples
    with seed + c, so the n choices differ. `reply`: the reply stream their chunks go to."""
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_CHOICES:
        raise InvalidRequestError(f"n must be an integer from 1 to {MAX_CHOICES}, got {n!r}")
    options = params.model_dump(exclude_defaults=True)
    new_rid = new_rid or (lambda: uuid.uuid4().hex)
    return [
        _message(new_rid(), prompt, _choice_options(options, params, choice), timeout_s, reply)
        for prompt in prompts
        for choice in range(n)
    ]


def _choice_options(options: dict, params: GenerateParams, choice: int) -> dict:
    fields = dict(options)
    if params.seed is not None and choice:
        fields["seed"] = (params.seed + choice) % 2**63
    elif not params.greedy and params.seed is None:
        fields["seed"] = random.getrandbits(63)
    return fields


def _message(
    rid: str, prompt: Prompt, params: dict, timeout_s: float | None, reply: str | None
) -> RequestMessage:
    chat = isinstance(prompt, Chat)
    return RequestMessage(
        rid=rid,
        prompt="" if chat else prompt,
        messages=prompt.messages if chat else None,
        params=params,
        timeout_s=timeout_s,
        client=process_name(),
        reply=reply,
    )


@dataclass
class Submission:
    """Validated requests bound for one stream under its depth limit."""

    requests: RequestSet
    stream: str
    max_depth: int | None
    keys: DeploymentKeys
    alive_ttl_s: int | None = None
    """TTL of the client's liveness key, set with the submit; None: no liveness key."""

    @property
    def checked_apart(self) -> bool:
        """Whether the stream is in another slot than the deployment's state: the state is
        then checked, and the liveness key set, before the script (`precheck`)."""
        return slot(self.stream) != slot(self.keys.state)

    def script_keys(self) -> list[str]:
        if self.checked_apart:
            return [self.stream]
        keys = [self.stream, self.keys.state]
        if self.alive_ttl_s is not None:
            keys.append(self.keys.client_alive(process_name()))
        return keys

    def precheck(self, pipe):
        """For a stream in another slot: `pipe` (not a transaction) with the state's read
        and the liveness key's refresh; `prechecked` reads its replies."""
        pipe.hmget(self.keys.state, "state", "error")
        if self.alive_ttl_s is not None:
            pipe.set(self.keys.client_alive(process_name()), 1, ex=self.alive_ttl_s)
        return pipe

    def prechecked(self, replies: list) -> None:
        """Raise `DeploymentFailedError` if the precheck found the deployment failed."""
        state, error = replies[0]
        if as_text(state, "replace") == FAILED:
            raise deployment_failed(self.keys.deployment, error)

    def script_args(self) -> list:
        args: list = [self.max_depth or 0, FAILED, self.alive_ttl_s or 0]
        for request in self.requests.requests:
            fields = wire.request_fields(request.message)
            args += [fields[wire.RID], fields[wire.PAYLOAD]]
        return args

    def rids(self) -> list[str]:
        return [r.rid for r in self.requests.requests]

    def accepted(self, entry_ids: list) -> RequestSet:
        """Note where each request's entry went (the check for a lost request looks there)."""
        self.requests.queued_at(self.stream, entry_ids)
        return self.requests

    def refusal(self, exc: redis.ResponseError) -> Exception:
        """The clear error for a refused batch (or the Redis error if it is another one)."""
        text = str(exc)
        if text.startswith("DEPLOYMENTFAILED"):
            return deployment_failed(self.keys.deployment, text.partition(" ")[2])
        if not text.startswith("QUEUEFULL"):
            return exc
        depth = text.split()[1] if len(text.split()) > 1 else "?"
        n = len(self.requests.requests)
        return QueueFullError(
            f"queue {self.stream} holds {depth} requests; adding {n} would pass its limit "
            f"of {self.max_depth} (broker.max_queue_depth): retry later or add workers"
        )


def deployment_failed(deployment: str, error: str | bytes | None) -> DeploymentFailedError:
    """What a client says when the deployment's state is `failed`."""
    if isinstance(error, bytes):
        error = error.decode(errors="replace")
    why = f": {error}" if error else ""
    return DeploymentFailedError(
        f"deployment {deployment!r} failed{why} (its workers keep dying; see the launcher's "
        "log, fix the cause and serve it again)"
    )

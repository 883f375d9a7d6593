"""A bulk job's record in Redis: what submitters write, what workers record, what any
process reads back (`mii bulk status | wait | results`), so a job outlives its submitter.

Keys (`DeploymentKeys.job(id)`, all under the deployment's hash tag):

    meta       hash   total, submitted, done, errors, tokens (counters); streamed (tokens
                      generated so far, lines still running included: the progress bar's
                      rate); created, finished, cancelled (epoch seconds); ttl_s,
                      fingerprint, format, model, params
    manifest   hash   line -> msgpack `LineInfo` (the line's id, its OpenAI endpoint)
    submitted  hash   line -> entry id of the line's request in the bulk stream ("" for a
                      line that was answered without one: refused at submit, cancelled)
    results    hash   line -> msgpack `LineResult`

A line's request carries `job` and `line` (`RequestMessage`); the worker that ends it runs
`RECORD_SCRIPT` in the same MULTI/EXEC that publishes the final chunk and acks the entry,
so a line has a result exactly when its request is done. The first result of a line wins
(HSETNX), so counters never count a line twice. Every change refreshes the TTL (`ttl_s`)
of all four keys: a job disappears `ttl_s` after its last activity. The scripts touch only
the job's keys and the bulk stream, all in one cluster slot.
"""

from __future__ import annotations

import time
from typing import Any

from pydantic import Field

from mii.broker_config.wire import ErrorKind, _Message, pack, unpack
from mii.constants import GenerationFinishReason


class LineInfo(_Message):
    """What the output needs of an input line besides its result."""

    id: str
    """The line's `id` (mii form) or `custom_id` (OpenAI form), else its line number."""
    url: str | None = None
    """The OpenAI endpoint the line was written for (its output is in OpenAI's form)."""
    logprobs: int | None = None
    """The line asked for log-probabilities, with this many alternatives a token."""


class LineResult(_Message):
    """How a line ended: recorded by the worker that served it (or by the submitter for a
    line it refused, or by `cancel` for a line no worker had read yet)."""

    text: str = ""
    plen: int = Field(0, ge=0)
    """Prompt tokens."""
    glen: int = Field(0, ge=0)
    """Generated tokens."""
    reason: GenerationFinishReason
    error: str | None = None
    etype: ErrorKind | None = None
    worker: str = ""
    t: float = 0.0
    """When it was recorded (the recorder's clock, epoch seconds)."""
    ids: list[int] | None = None
    lp: list[float] | None = None
    toks: list[str] | None = None
    top: list[list[tuple[int, float, str]]] | None = None
    """With `logprobs` asked: the generated token ids, each one's log-probability, its text
    and its best alternatives (token id, log-probability, text), as a response chunk's."""


def result_payload(reason, *, text: str = "", plen: int = 0, glen: int = 0, **extra) -> bytes:
    """A `LineResult`, packed without a pydantic pass (the worker's publish path); tests
    check that it decodes. `extra`: error, etype, worker."""
    fields: dict[str, Any] = dict(v=1, text=text, plen=plen, glen=glen, t=time.time())
    fields["reason"] = GenerationFinishReason(reason).value
    if extra.get("etype") is not None:
        extra["etype"] = ErrorKind(extra["etype"]).value
    fields.update({k: v for k, v in extra.items() if v is not None and v != ""})
    return pack(fields)


def decode_result(payload: bytes) -> LineResult:
    return unpack(LineResult, payload)


def decode_info(payload: bytes) -> LineInfo:
    return unpack(LineInfo, payload)


def info_payload(info: LineInfo) -> bytes:
    return pack(info.model_dump(exclude_defaults=True) | {"v": 1})


# ---- Lua ------------------------------------------------------------------------------
# KEYS of every job script: meta, manifest, submitted, results[, bulk stream].
_PRELUDE = """
local function record(line, result, tokens, is_error, now)
  if redis.call('HSETNX', KEYS[4], line, result) == 0 then return 0 end
  redis.call('HINCRBY', KEYS[1], 'tokens', tokens)
  if is_error == '1' then redis.call('HINCRBY', KEYS[1], 'errors', 1) end
  local done = redis.call('HINCRBY', KEYS[1], 'done', 1)
  if done == tonumber(redis.call('HGET', KEYS[1], 'total')) then
    redis.call('HSET', KEYS[1], 'finished', now)
  end
  return 1
end
local function refresh(ttl)
  for i = 1, 4 do redis.call('EXPIRE', KEYS[i], ttl) end
end
local ttl = redis.call('HGET', KEYS[1], 'ttl_s')
"""

RECORD_SCRIPT = (
    _PRELUDE
    + """
-- ARGV: now, then per line: line, packed LineResult, generated tokens, 1 if an error
if not ttl then return 0 end  -- the job expired or was deleted: nothing to record into
local n = 0
for i = 2, #ARGV, 4 do
  n = n + record(ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[1])
end
refresh(ttl)
return n
"""
)

STREAMED_SCRIPT = """
-- KEYS: the job's meta. ARGV: tokens a worker generated for the job's lines in one step.
-- A job that expired or was deleted is not brought back.
if redis.call('EXISTS', KEYS[1]) == 1 then
  redis.call('HINCRBY', KEYS[1], 'streamed', ARGV[1])
end
return 0
"""

CREATE_SCRIPT = """
-- KEYS: meta, manifest, submitted, results; ARGV: fingerprint, then field, value pairs.
-- Returns the fingerprint of the job under this id: ours if we created it.
local existing = redis.call('HGET', KEYS[1], 'fingerprint')
if existing then return existing end
redis.call('HSET', KEYS[1], 'fingerprint', ARGV[1])
for i = 2, #ARGV, 2 do redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1]) end
local ttl = redis.call('HGET', KEYS[1], 'ttl_s')
for i = 1, 4 do redis.call('EXPIRE', KEYS[i], ttl) end
return ARGV[1]
"""

SUBMIT_SCRIPT = (
    _PRELUDE
    + """
-- KEYS[5]: the bulk stream. ARGV: now, depth limit (0: none), then per line:
--   line, 'q', request id, packed RequestMessage    (queue it)
--   line, 'e', packed LineResult, ''                 (refused at submit: record it)
-- A line already submitted is skipped: resubmitting never queues a line twice. Stops at
-- the depth limit; returns how many lines it went through (the caller retries the rest).
if not ttl then return redis.error_reply('NOJOB') end
if redis.call('HEXISTS', KEYS[1], 'cancelled') == 1 then
  return redis.error_reply('CANCELLED')
end
local limit = tonumber(ARGV[2])
local depth = redis.call('XLEN', KEYS[5])
local taken = 0
for i = 3, #ARGV, 4 do
  local line = ARGV[i]
  if redis.call('HEXISTS', KEYS[3], line) == 0 then
    if ARGV[i + 1] == 'q' then
      if limit > 0 and depth >= limit then break end
      local id = redis.call('XADD', KEYS[5], '*', 'rid', ARGV[i + 2], 'm', ARGV[i + 3])
      depth = depth + 1
      redis.call('HSET', KEYS[3], line, id)
    else
      record(line, ARGV[i + 2], 0, '1', ARGV[1])
      redis.call('HSET', KEYS[3], line, '')
    end
    redis.call('HINCRBY', KEYS[1], 'submitted', 1)
  end
  taken = taken + 1
end
refresh(ttl)
return taken
"""
)

CANCEL_SCRIPT = (
    _PRELUDE
    + """
-- KEYS[5]: the bulk stream. ARGV: now, consumer group, packed cancelled LineResult, lines.
-- A line no worker has read is deleted from the stream and recorded as cancelled here (as
-- is a line never submitted). Returns the lines a worker holds or that moved (a handed-back
-- request is queued again under a new entry): the caller cancels those by request id.
if not ttl then return redis.error_reply('NOJOB') end
if redis.call('HEXISTS', KEYS[1], 'finished') == 1 then return {} end  -- nothing to stop
if redis.call('HEXISTS', KEYS[1], 'cancelled') == 0 then
  redis.call('HSET', KEYS[1], 'cancelled', ARGV[1])  -- from now on, submits are refused
end
local held = {}
for i = 4, #ARGV do
  local line = ARGV[i]
  if redis.call('HEXISTS', KEYS[4], line) == 0 then
    local id = redis.call('HGET', KEYS[3], line)
    if not id or id == '' then
      record(line, ARGV[3], 0, '0', ARGV[1])
      redis.call('HSET', KEYS[3], line, '')
    else
      local pending = redis.pcall('XPENDING', KEYS[5], ARGV[2], id, id, 1)
      local delivered = pending.err == nil and #pending > 0  -- err: no group yet
      if not delivered and redis.call('XDEL', KEYS[5], id) == 1 then
        record(line, ARGV[3], 0, '0', ARGV[1])
      else
        held[#held + 1] = line
      end
    end
  end
end
refresh(ttl)
return held
"""
)

"""Reading a worker's input: the control stream and new request entries.

While the engine is busy, one Lua script call per step reads both, interactive entries
before bulk ones, in a single round trip (the step waits for it). While the engine is
idle, the worker blocks on the interactive stream instead, then glances at bulk.
"""

from __future__ import annotations

from mii.broker_config.keys import WORKER_GROUP, DeploymentKeys
from mii.worker.intake import Entry

POLL_SCRIPT = """
local control = redis.call('XREAD', 'COUNT', 256, 'STREAMS', KEYS[1], ARGV[1])
local n = tonumber(ARGV[4])
if n == 0 then return {control, false} end
for i = 2, 3 do
  local ok, reply = pcall(redis.call, 'XREADGROUP', 'GROUP', ARGV[2], ARGV[3],
                          'COUNT', n, 'STREAMS', KEYS[i], '>')
  if not ok then return redis.error_reply(reply.err or tostring(reply)) end
  if reply then return {control, reply} end
end
return {control, false}
"""


class Reader:
    def __init__(self, redis, keys: DeploymentKeys, consumer: str, script: bool = True) -> None:
        """`script=False` reads with plain commands (two round trips while busy); for
        servers without Lua, and for fakeredis, whose Lua runtime is not thread-safe."""
        self.redis, self.keys, self.consumer = redis, keys, consumer
        self.control_id = "0-0"
        self._script = redis.register_script(POLL_SCRIPT) if script else None

    def start_after_latest_control(self) -> None:
        """Control messages sent before this worker started are not for it."""
        last = self.redis.xrevrange(self.keys.control, count=1)
        self.control_id = _text(last[0][0]) if last else "0-0"

    def poll(self, count: int, block_ms: int | None) -> tuple[list[dict], list[tuple[Entry, dict]]]:
        """(control messages' fields, new entries); blocks only when `block_ms` is given."""
        if block_ms is None:
            return self._poll_busy(count)
        return self._poll_idle(count, block_ms)

    def _poll_busy(self, count: int):
        if self._script is None:
            return self._poll_commands(count, None)
        keys = [self.keys.control, self.keys.requests, self.keys.bulk]
        args = [self.control_id, WORKER_GROUP, self.consumer, count]
        control, entries = self._script(keys=keys, args=args)
        return self._control(control), _entries(entries or [], pairs=True)

    def _poll_idle(self, count: int, block_ms: int):
        return self._poll_commands(count, block_ms)

    def _poll_commands(self, count: int, block_ms: int | None):
        pipe = self.redis.pipeline(transaction=False)
        pipe.xread({self.keys.control: self.control_id}, count=256)
        streams = {self.keys.requests: ">"}
        if count:
            pipe.xreadgroup(WORKER_GROUP, self.consumer, streams, count=count, block=block_ms)
        control, reply = (*pipe.execute(), None)[:2]
        entries = _entries(reply)
        if count and not entries:  # bulk only when no interactive work is waiting
            reply = self.redis.xreadgroup(
                WORKER_GROUP, self.consumer, {self.keys.bulk: ">"}, count=count
            )
            entries = _entries(reply)
        return self._control(control), entries

    def cancelled(self, rids: list[str]) -> set[str]:
        """Which of these requests were cancelled before this worker read them."""
        if not rids:
            return set()
        pipe = self.redis.pipeline(transaction=False)
        for rid in rids:
            pipe.exists(self.keys.cancelled(rid))
        return {rid for rid, hit in zip(rids, pipe.execute(), strict=True) if hit}

    def _control(self, reply) -> list[dict]:
        messages = []
        for _, entries in reply or []:
            for entry_id, fields in entries:
                self.control_id = _text(entry_id)
                messages.append(_as_dict(fields))
        return messages


def _as_dict(fields) -> dict:
    """Fields as redis-py parses them (a dict) or as a Lua script returns them (a flat list)."""
    if isinstance(fields, dict):
        return fields
    return {fields[i]: fields[i + 1] for i in range(0, len(fields), 2)}


def _entries(reply, pairs: bool = False) -> list[tuple[Entry, dict]]:
    return [
        (Entry(_text(stream), _text(entry_id)), _as_dict(fields) if fields else {})
        for stream, entries in (reply or [])
        for entry_id, fields in entries
    ]


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else value

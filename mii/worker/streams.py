"""A worker's I/O on the request streams of its consumer group.

Reading (`Reader`): the control stream and new request entries. While the engine is busy,
one Lua script call per step reads both, interactive entries before bulk ones, in a single
round trip (the step waits for it). While the engine is idle, the worker blocks on the
interactive stream instead, then glances at bulk.

With several partitions (each in its own slot of a Redis Cluster, where one command or
script cannot read them together), one pipeline reads the control stream and every
partition without blocking, each for its share of the entries wanted (the cluster client
sends each node its part at once); an idle worker that found nothing then blocks on one
partition, each in turn, for `block_ms` / K: an entry in another partition waits at most
that long for an idle worker.

Holding and taking over (`Leases`): an entry stays in its stream's pending list, owned by
the worker that read it, until that worker acknowledges it after the final chunk. The
owner refreshes the entries' idle time every heartbeat (XCLAIM ... JUSTID, which does not
count as a delivery); an entry idle for longer than `reclaim_idle_s` belongs to a dead
worker, and any live worker with room takes it (XAUTOCLAIM, which does count); so does a
worker that knows the owner is dead, at once. What the dead worker already published stays
in the request's response stream (`mii.broker_config.replay`): the new owner continues
there.
"""

from __future__ import annotations

from collections.abc import Iterable

from mii.broker_config.connection import as_text
from mii.broker_config.keys import WORKER_GROUP, DeploymentKeys
from mii.broker_config.replay import Replayed, replay
from mii.worker.intake import Admission, Entry

_PENDING_PAGE = 10_000
MIN_TAKEOVER_IDLE_MS = 500

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
        self._turn = 0  # the partition that gets the remainder of a read, and idle blocks

    def start_after_latest_control(self) -> None:
        """Control messages sent before this worker started are not for it."""
        last = self.redis.xrevrange(self.keys.control, count=1)
        self.control_id = as_text(last[0][0]) if last else "0-0"

    def poll(self, count: int, block_ms: int | None) -> tuple[list[dict], list[tuple[Entry, dict]]]:
        """(control messages' fields, new entries); blocks only when `block_ms` is given."""
        if block_ms is None:
            return self._poll_busy(count)
        return self._poll_idle(count, block_ms)

    def _poll_busy(self, count: int):
        if self.keys.partitions > 1:
            return self._poll_partitions(count, None)
        if self._script is None:
            return self._poll_commands(count, None)
        keys = [self.keys.control, self.keys.requests, self.keys.bulk]
        args = [self.control_id, WORKER_GROUP, self.consumer, count]
        control, entries = self._script(keys=keys, args=args)
        return self._control(control), _entries(entries or [], pairs=True)

    def _poll_idle(self, count: int, block_ms: int):
        if self.keys.partitions > 1:
            return self._poll_partitions(count, block_ms)
        return self._poll_commands(count, block_ms)

    def _poll_partitions(self, count: int, block_ms: int | None):
        """Control and every partition in one pipeline; idle and empty-handed, a short
        block on one partition (each in turn); bulk when no interactive entry came."""
        streams = self.keys.request_partitions
        self._turn = (self._turn + 1) % len(streams)
        shares = _shares(count, len(streams), self._turn)
        pipe = self.redis.pipeline(transaction=False)
        pipe.xread({self.keys.control: self.control_id}, count=256)
        for stream, share in zip(streams, shares, strict=True):
            if share:
                pipe.xreadgroup(WORKER_GROUP, self.consumer, {stream: ">"}, count=share)
        control, *replies = pipe.execute()
        entries = [e for reply in replies for e in _entries(reply)]
        if count and not entries and block_ms is not None:
            block, stream = max(1, block_ms // len(streams)), streams[self._turn]
            reply = self.redis.xreadgroup(
                WORKER_GROUP, self.consumer, {stream: ">"}, count=count, block=block
            )
            entries = _entries(reply)
        if count and not entries:
            reply = self.redis.xreadgroup(
                WORKER_GROUP, self.consumer, {self.keys.bulk: ">"}, count=count
            )
            entries = _entries(reply)
        return self._control(control), entries

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
                self.control_id = as_text(entry_id)
                messages.append(_as_dict(fields))
        return messages


def _shares(count: int, partitions: int, first: int) -> list[int]:
    """`count` entries split over the partitions, the remainder from `first` on."""
    base, rest = divmod(count, partitions)
    return [base + ((i - first) % partitions < rest) for i in range(partitions)]


def _as_dict(fields) -> dict:
    """Fields as redis-py parses them (a dict) or as a Lua script returns them (a flat list)."""
    if isinstance(fields, dict):
        return fields
    return {fields[i]: fields[i + 1] for i in range(0, len(fields), 2)}


def _entries(reply, pairs: bool = False) -> list[tuple[Entry, dict]]:
    return [
        (Entry(as_text(stream), as_text(entry_id)), _as_dict(fields) if fields else {})
        for stream, entries in (reply or [])
        for entry_id, fields in entries
    ]


class Leases:
    def __init__(self, redis, keys: DeploymentKeys, consumer: str, reclaim_idle_s: float) -> None:
        self.redis, self.keys, self.consumer = redis, keys, consumer
        self.reclaim_idle_ms = int(reclaim_idle_s * 1000)
        self._cursors = dict.fromkeys(keys.request_streams(), "0-0")

    def heartbeat(self, held: Iterable[Entry]) -> list[Entry]:
        """Refresh the idle time of held entries; return those no longer ours (another
        worker reclaimed them while we stalled, or they were dead-lettered)."""
        lost: list[Entry] = []
        by_stream: dict[str, list[Entry]] = {}
        for entry in held:
            by_stream.setdefault(entry.stream, []).append(entry)
        for stream, entries in by_stream.items():
            mine = self._my_pending(stream)
            keep = [e.entry_id for e in entries if e.entry_id in mine]
            lost += self._held_by_others(stream, [e for e in entries if e.entry_id not in mine])
            if keep:
                self.redis.xclaim(stream, WORKER_GROUP, self.consumer, 0, keep, justid=True)
        return lost

    def _held_by_others(self, stream: str, missing: list[Entry]) -> list[Entry]:
        """Of entries no longer pending to us, those another worker holds. One that nobody
        holds was dropped from Redis (a flush, a Redis that came back empty): keep serving
        it, since nobody else will; its ack at the end is a no-op."""
        if not missing:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for entry in missing:
            pipe.xpending_range(stream, WORKER_GROUP, entry.entry_id, entry.entry_id, 1)
        return [entry for entry, rows in zip(missing, pipe.execute(), strict=True) if rows]

    def _my_pending(self, stream: str) -> set[str]:
        rows = self.redis.xpending_range(
            stream, WORKER_GROUP, "-", "+", _PENDING_PAGE, consumername=self.consumer
        )
        return {as_text(row["message_id"]) for row in rows}

    def reclaim(self, limit: int) -> list[tuple[Entry, dict | None]]:
        """Take up to `limit` entries idle past the reclaim time, with their delivery
        counts (a deleted entry comes back with fields None)."""
        claimed: list[tuple[str, str, dict | None]] = []
        for stream in self.keys.request_streams():
            if len(claimed) >= limit:
                break
            claimed += self._autoclaim(stream, limit - len(claimed))
        counts = self._delivery_counts([(s, i) for s, i, _ in claimed])
        return [(Entry(s, i, n), f) for (s, i, f), n in zip(claimed, counts, strict=True)]

    def reclaim_from(self, dead: set[str], limit: int) -> list[tuple[Entry, dict | None]]:
        """Take up to `limit` entries held by workers known to be dead, without waiting for
        `reclaim_idle_s` (a short minimum idle time keeps two takers from both winning)."""
        claimed: list[tuple[str, str, dict | None]] = []
        for stream in self.keys.request_streams():
            for consumer in self._holders(stream) & dead:
                if len(claimed) >= limit:
                    break
                claimed += self._claim_all(stream, consumer, limit - len(claimed))
        counts = self._delivery_counts([(s, i) for s, i, _ in claimed])
        return [(Entry(s, i, n), f) for (s, i, f), n in zip(claimed, counts, strict=True)]

    def _holders(self, stream: str) -> set[str]:
        summary = self.redis.xpending(stream, WORKER_GROUP)
        return {as_text(c["name"]) for c in summary.get("consumers") or []}

    def _claim_all(self, stream: str, consumer: str, count: int) -> list[tuple[str, str, dict]]:
        rows = self.redis.xpending_range(
            stream, WORKER_GROUP, "-", "+", count, consumername=consumer
        )
        ids = [as_text(row["message_id"]) for row in rows]
        if not ids:
            return []
        reply = self.redis.xclaim(stream, WORKER_GROUP, self.consumer, MIN_TAKEOVER_IDLE_MS, ids)
        return [(stream, as_text(entry_id), fields) for entry_id, fields in reply]

    def _autoclaim(self, stream: str, count: int) -> list[tuple[str, str, dict | None]]:
        reply = self.redis.xautoclaim(
            stream,
            WORKER_GROUP,
            self.consumer,
            self.reclaim_idle_ms,
            start_id=self._cursors[stream],
            count=count,
        )
        self._cursors[stream] = as_text(reply[0])
        return [(stream, as_text(entry_id), fields) for entry_id, fields in reply[1]]

    def _delivery_counts(self, entries: list[tuple[str, str]]) -> list[int]:
        if not entries:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for stream, entry_id in entries:
            pipe.xpending_range(stream, WORKER_GROUP, entry_id, entry_id, 1)
        rows = pipe.execute()
        return [row[0]["times_delivered"] if row else 1 for row in rows]

    def published(self, admissions: list[Admission]) -> list[Replayed]:
        """What each request already published, each token index once, in one round trip:
        its response stream, or its chunks in its reply stream since it was queued; a bulk
        line publishes nothing (it starts over)."""
        pipe = self.redis.pipeline(transaction=False)
        for adm in admissions:
            if adm.entry.reply is not None:
                pipe.xrange(self.keys.replies(adm.entry.reply), min=f"{adm.since_ms}-0")
            else:
                pipe.xrange(self.keys.response(adm.rid))
        replies = pipe.execute() if admissions else []
        return [_replay(adm, got) for adm, got in zip(admissions, replies, strict=True)]


def _replay(adm: Admission, entries) -> Replayed:
    if adm.entry.job is not None:
        return Replayed()
    return replay(entries, rid=adm.rid if adm.entry.reply is not None else None)

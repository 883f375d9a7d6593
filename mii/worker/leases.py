"""Holding on to pending entries, and taking over those of dead workers.

An entry stays in its stream's pending list, owned by the worker that read it, until that
worker acknowledges it after the final chunk. The owner refreshes the entries' idle time
every heartbeat (XCLAIM ... JUSTID, which does not count as a delivery); an entry idle for
longer than `reclaim_idle_s` belongs to a dead worker, and any live worker with room takes
it (XAUTOCLAIM, which does count). What the dead worker already published stays in the
request's response stream: `published_tokens` reads it so the new owner continues there.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from mii.broker_config import wire
from mii.broker_config.keys import WORKER_GROUP, DeploymentKeys
from mii.broker_config.wire import WireError
from mii.worker.intake import Entry

_PENDING_PAGE = 10_000
MIN_TAKEOVER_IDLE_MS = 500


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else value


@dataclass
class Published:
    """What a response stream already holds."""

    token_ids: list[int] = field(default_factory=list)
    final: bool = False


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
        return {_text(row["message_id"]) for row in rows}

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
        return {_text(c["name"]) for c in summary.get("consumers") or []}

    def _claim_all(self, stream: str, consumer: str, count: int) -> list[tuple[str, str, dict]]:
        rows = self.redis.xpending_range(
            stream, WORKER_GROUP, "-", "+", count, consumername=consumer
        )
        ids = [_text(row["message_id"]) for row in rows]
        if not ids:
            return []
        reply = self.redis.xclaim(stream, WORKER_GROUP, self.consumer, MIN_TAKEOVER_IDLE_MS, ids)
        return [(stream, _text(entry_id), fields) for entry_id, fields in reply]

    def _autoclaim(self, stream: str, count: int) -> list[tuple[str, str, dict | None]]:
        reply = self.redis.xautoclaim(
            stream,
            WORKER_GROUP,
            self.consumer,
            self.reclaim_idle_ms,
            start_id=self._cursors[stream],
            count=count,
        )
        self._cursors[stream] = _text(reply[0])
        return [(stream, _text(entry_id), fields) for entry_id, fields in reply[1]]

    def _delivery_counts(self, entries: list[tuple[str, str]]) -> list[int]:
        if not entries:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for stream, entry_id in entries:
            pipe.xpending_range(stream, WORKER_GROUP, entry_id, entry_id, 1)
        rows = pipe.execute()
        return [row[0]["times_delivered"] if row else 1 for row in rows]

    def published_tokens(self, request_id: str) -> Published:
        """The tokens already in a request's response stream, each index once."""
        return _published(self.redis.xrange(self.keys.response(request_id)))

    def published_many(self, request_ids: list[str]) -> list[Published]:
        """`published_tokens` of several requests in one round trip."""
        if not request_ids:
            return []
        pipe = self.redis.pipeline(transaction=False)
        for rid in request_ids:
            pipe.xrange(self.keys.response(rid))
        return [_published(entries) for entries in pipe.execute()]


def _published(entries) -> Published:
    published = Published()
    for _, fields in entries:
        try:
            chunk = wire.decode_chunk(fields)
        except WireError:
            continue
        fresh = len(published.token_ids) - chunk.i
        if fresh < len(chunk.ids) and fresh >= 0:
            published.token_ids += chunk.ids[fresh:]
        published.final = published.final or chunk.final
    return published

"""Parsing and tokenizing request entries on a thread of their own.

Tokenizing a long prompt takes a while (a 4 MB prompt about 4 s with a fast tokenizer,
which releases the GIL while it works); on the engine's thread that would stall every
other stream of the worker. The loop hands new entries to `BackgroundParser` and picks up
the parsed ones, in order, between its steps.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor, wait

from mii.worker.intake import Admission, Entry, Refusal, readable_rid

Parsed = Admission | Refusal


class BackgroundParser:
    def __init__(self, parse: Callable[[Entry, dict], Parsed]) -> None:
        self._parse = parse
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="mii-intake")
        self._pending: deque[tuple[Entry, Future]] = deque()

    def submit(self, entries: list[tuple[Entry, dict]]) -> None:
        for entry, fields in entries:
            self._pending.append((entry, self._executor.submit(self._safe_parse, entry, fields)))

    def _safe_parse(self, entry: Entry, fields: dict) -> Parsed:
        try:
            return self._parse(entry, fields)
        except Exception as exc:  # noqa: BLE001 (a tokenizer can raise anything; one entry fails)
            error = f"could not read the request: {type(exc).__name__}: {exc}"
            return Refusal(entry, readable_rid(fields), error)

    @property
    def pending(self) -> int:
        return len(self._pending)

    def entries(self) -> list[Entry]:
        """The entries still being parsed (held by this worker all the same)."""
        return [entry for entry, _ in self._pending]

    def ready(self, wait_s: float = 0.0) -> list[Parsed]:
        """The parsed entries, in the order they came; waits up to `wait_s` for them all."""
        if self._pending and wait_s > 0:
            wait([future for _, future in self._pending], timeout=wait_s)
        done = []
        while self._pending and self._pending[0][1].done():
            done.append(self._pending.popleft()[1].result())
        return done

    def drop(self) -> list[Entry]:
        """Forget the entries not parsed yet (their results are ignored); return them."""
        entries = self.entries()
        self._pending.clear()
        return entries

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

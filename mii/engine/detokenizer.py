"""Incremental detokenization that never emits half a UTF-8 character, and stop strings.

Text is released in deltas. Decoding a window of recent tokens and diffing it against the
same window minus the newest token gives each token's text in context (sentencepiece
spaces, merged byte tokens); a delta ending in U+FFFD means a character is still
incomplete, so it waits. The tail that could still grow into a stop string is held back
until it can't, so a stop string that spans tokens never leaks into the output.
"""

from __future__ import annotations

from collections.abc import Sequence

REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer,
        stop: Sequence[str] = (),
        generated_token_ids: Sequence[int] = (),
        skip_special_tokens: bool = True,
    ) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(stop)
        self.hold_back = max((len(s) for s in self.stop), default=1) - 1
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0
        self.text = ""  # all decoded text so far (cut at a stop string once one matched)
        self.released = 0  # characters of `text` already handed out
        self.stopped = False
        for token_id in generated_token_ids:  # resume: rebuild state, release nothing
            self.add_token(token_id)
        self.released = self._releasable(finished=False)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add_token(self, token_id: int) -> None:
        """Decode one more token; sets `stopped` when a stop string appears."""
        self.token_ids.append(token_id)
        if self.stopped:
            return
        prefix = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.token_ids[self.prefix_offset :])
        if len(full) <= len(prefix) or full.endswith(REPLACEMENT):
            return  # an incomplete character, or a token with no text (yet)
        delta = full[len(prefix) :]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.token_ids)
        self._append(delta)

    def _append(self, delta: str) -> None:
        search_from = max(0, len(self.text) - self.hold_back)
        self.text += delta
        hits = [i for s in self.stop if (i := self.text.find(s, search_from)) >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.stopped = True

    def _releasable(self, finished: bool) -> int:
        if finished or self.stopped:
            return len(self.text)
        return max(self.released, len(self.text) - self.hold_back)

    def _flush(self) -> None:
        """At the end, release an incomplete character as it decodes (U+FFFD)."""
        if self.stopped or self.read_offset == len(self.token_ids):
            return
        prefix = self._decode(self.token_ids[self.prefix_offset : self.read_offset])
        full = self._decode(self.token_ids[self.prefix_offset :])
        self.read_offset = len(self.token_ids)
        if len(full) > len(prefix):
            self._append(full[len(prefix) :])

    def take(self, finished: bool) -> str:
        """The text that can be released now (all of it once the request finished)."""
        if finished:
            self._flush()
        end = self._releasable(finished)
        delta, self.released = self.text[self.released : end], end
        return delta

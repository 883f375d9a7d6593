"""Joining a request's response chunks into deltas and a final `Response` (no I/O here, so
the blocking, streaming and asyncio clients share it)."""

from __future__ import annotations

from mii.broker_config.replay import take
from mii.broker_config.wire import ErrorKind, ResponseChunk
from mii.errors import GenerationError, InvalidRequestError, MIIError
from mii.params import GenerateParams
from mii.response import Response, ResponseParts


class ResponseAssembler:
    """Feed chunks in stream order; each token index is taken once (a reclaimed request may
    replay tokens another worker already published)."""

    def __init__(self, rid: str, prompt, params: GenerateParams) -> None:
        self.rid = rid
        self.parts = ResponseParts(prompt, params.return_full_text, params.logprobs is not None)
        self.error: MIIError | None = None

    @property
    def done(self) -> bool:
        return self.parts.finish_reason is not None

    @property
    def token_ids(self) -> list[int]:
        return self.parts.token_ids

    def feed(self, chunk: ResponseChunk) -> Response | None:
        """The delta this chunk adds, or None when it repeats tokens already seen."""
        if self.done:
            return None
        self.parts.prompt_length = chunk.plen or self.parts.prompt_length
        taken = take(chunk, len(self.token_ids))
        if taken is None:
            raise GenerationError(
                f"request {self.rid}: token {chunk.i} arrived before token {len(self.token_ids)}"
            )
        fresh, new_text = taken
        self.parts.add(fresh, new_text, *_tails(len(fresh), chunk.lp, chunk.toks, chunk.top))
        if chunk.final:
            self._finish(chunk)
        elif not fresh:
            return None
        return self.parts.delta(fresh, new_text)

    def _finish(self, chunk: ResponseChunk) -> None:
        self.parts.finish_reason = chunk.reason
        if chunk.error is not None:
            cls = (
                InvalidRequestError if chunk.etype == ErrorKind.INVALID_REQUEST else GenerationError
            )
            self.error = cls(f"request {self.rid}: {chunk.error}")

    def response(self) -> Response:
        """The whole response; raises the worker's error if the request failed."""
        if self.error is not None:
            raise self.error
        return self.parts.response()


def _tails(n: int, *per_token: list | None) -> list[list | None]:
    """The entries of the last `n` tokens of each per-token list of a chunk (the fresh ones)."""
    return [values[len(values) - n :] if values else None for values in per_token]

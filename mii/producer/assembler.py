"""Joining a request's response chunks into deltas and a final `Response` (no I/O here, so
the blocking, streaming and asyncio clients share it)."""

from __future__ import annotations

from mii.broker_config.wire import ErrorKind, ResponseChunk
from mii.constants import GenerationFinishReason
from mii.errors import GenerationError, InvalidRequestError, MIIError
from mii.params import GenerateParams
from mii.response import Response


class ResponseAssembler:
    """Feed chunks in stream order; each token index is taken once (a reclaimed request may
    replay tokens another worker already published)."""

    def __init__(self, rid: str, prompt, params: GenerateParams) -> None:
        self.rid, self.prompt, self.params = rid, prompt, params
        self.last_id = "0-0"
        self.text: list[str] = []
        self.token_ids: list[int] = []
        self.logprobs: list[float] = []
        self.prompt_length = 0
        self.finish_reason: GenerationFinishReason | None = None
        self.error: MIIError | None = None

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def feed(self, chunk: ResponseChunk) -> Response | None:
        """The delta this chunk adds, or None when it repeats tokens already seen."""
        if self.done:
            return None
        self.prompt_length = chunk.plen or self.prompt_length
        fresh = (
            chunk.ids[len(self.token_ids) - chunk.i :] if chunk.i <= len(self.token_ids) else None
        )
        if fresh is None:
            raise GenerationError(
                f"request {self.rid}: token {chunk.i} arrived before token {len(self.token_ids)}"
            )
        new_text = chunk.text if len(fresh) == len(chunk.ids) else ""
        self._append(fresh, new_text, chunk)
        if chunk.final:
            self._finish(chunk)
        elif not fresh:
            return None
        return self._delta(fresh, new_text)

    def _append(self, fresh: list[int], text: str, chunk: ResponseChunk) -> None:
        self.token_ids += fresh
        self.text.append(text)
        if chunk.lp:
            self.logprobs += chunk.lp[len(chunk.lp) - len(fresh) :]

    def _finish(self, chunk: ResponseChunk) -> None:
        self.finish_reason = chunk.reason
        if chunk.error is not None:
            cls = (
                InvalidRequestError if chunk.etype == ErrorKind.INVALID_REQUEST else GenerationError
            )
            self.error = cls(f"request {self.rid}: {chunk.error}")

    def _delta(self, ids: list[int], text: str) -> Response:
        return Response(
            generated_text=text,
            prompt_length=self.prompt_length,
            generated_length=len(self.token_ids),
            finish_reason=self.finish_reason or GenerationFinishReason.NONE,
            token_ids=list(ids),
        )

    def response(self) -> Response:
        """The whole response; raises the worker's error if the request failed."""
        if self.error is not None:
            raise self.error
        text = "".join(self.text)
        if self.params.return_full_text and isinstance(self.prompt, str):
            text = self.prompt + text
        return Response(
            generated_text=text,
            prompt_length=self.prompt_length,
            generated_length=len(self.token_ids),
            finish_reason=self.finish_reason or GenerationFinishReason.NONE,
            token_ids=self.token_ids,
            logprobs=self.logprobs if self.params.logprobs is not None else None,
        )

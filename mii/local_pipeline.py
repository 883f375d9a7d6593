"""`MIIPipeline`: the engine in this process, no Redis (what `mii.pipeline()` returns)."""

from __future__ import annotations

import dataclasses
import threading
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from typing import Protocol

from mii.config import ModelConfig
from mii.constants import GenerationFinishReason
from mii.engine.engine import LLMEngine
from mii.engine.loader import resolve_model_path
from mii.engine.outputs import RequestOutput
from mii.engine.tp.launched import LaunchedGroup
from mii.params import GenerateParams, as_prompt_list, encode_prompt
from mii.response import Response, ResponseParts

Prompt = str | list[int]


class Lead(Protocol):
    """Rank 0's side of a launcher's processes (`mii.launched_pipeline.LaunchedLead`)."""

    group: LaunchedGroup

    def end_call(self, responses: list[Response] | None, error: BaseException | None) -> None:
        """Let the other ranks return from the call."""


def _parts(prompt: Prompt, prompt_length: int, params: GenerateParams) -> ResponseParts:
    return ResponseParts(prompt, params.return_full_text, params.logprobs is not None,
                         prompt_length)  # fmt: skip


def _add(parts: ResponseParts, out: RequestOutput) -> None:
    """What the pipeline accumulates from one engine output of a request."""
    logprobs = [lp.logprob for lp in out.logprobs] if out.logprobs else None
    parts.add(list(out.token_ids), out.text, logprobs)
    if out.finished:
        parts.finish_reason = out.finish_reason


class MIIPipeline:
    """Call it with prompts and generation options; get one `Response` per prompt."""

    def __init__(
        self,
        model_config: ModelConfig,
        all_rank_output: bool = False,
        lead: Lead | None = None,
    ) -> None:
        """`lead`: this process is rank 0 of a launcher's processes (`launched_pipeline`)."""
        self.model_config = model_config
        self.all_rank_output = all_rank_output
        self.lead = lead
        path = resolve_model_path(model_config.model_name_or_path)
        config = model_config.to_engine_config(path)
        if lead is None:
            self.engine = LLMEngine(config)
        else:
            config = dataclasses.replace(config, device=str(lead.group.device))
            self.engine = LLMEngine(config, tp=lead.group.leader_context())
        self.tokenizer = self.engine.tokenizer
        self._lock = threading.Lock()  # one thread steps the engine at a time
        self._routes: dict[str, Callable[[RequestOutput], None]] = {}  # request -> its call

    def __call__(self, prompts: Prompt | list[Prompt], **kwargs) -> list[Response]:
        """One `Response` per prompt. Calls from several threads share the engine's steps:
        every step serves the requests of every call under way."""
        responses, error = None, None
        try:
            pending = self._submit(prompts, kwargs)
            sink = {rid: (lambda out, p=parts: _add(p, out)) for rid, parts in pending.items()}
            self._run(sink, lambda: all(p.finish_reason for p in pending.values()))
            responses = [parts.response() for parts in pending.values()]
            return responses
        except BaseException as exc:
            error = exc
            raise
        finally:
            self._end_call(responses, error)

    def stream(self, prompt: Prompt, **kwargs) -> Iterator[Response]:
        """Yield one `Response` per engine step holding that step's new text and tokens."""
        error = None
        try:
            pending = self._submit([prompt], kwargs)
            (request_id,) = pending
            arrived: deque[RequestOutput] = deque()
            self._routes[request_id] = arrived.append
            try:
                while True:
                    while arrived:
                        out = arrived.popleft()
                        yield _delta(out)
                        if out.finished:
                            return
                    self._step_for({request_id})
            finally:
                self._release(pending)
        except Exception as exc:  # not GeneratorExit: a stream closed early is no error
            error = exc
            raise
        finally:
            self._end_call(None, error)

    def _run(self, sink: dict[str, Callable[[RequestOutput], None]], done) -> None:
        """Step the engine (taking turns with other threads) until `done()`; each output
        goes to the sink of its request, whichever thread's call it is."""
        self._routes.update(sink)
        try:
            while not done():
                self._step_for(set(sink), done)
        finally:
            self._release(sink)

    def _step_for(self, rids: set[str], done=None) -> None:
        """One engine step, unless another thread's step already served `rids` to `done`."""
        with self._lock:
            if (done is not None and done()) or not self.engine.has_unfinished_requests():
                return
            for out in self.engine.step():
                route = self._routes.get(out.request_id)
                if route is not None:
                    route(out)

    def _release(self, rids) -> None:
        """Free what a call leaves in the engine (an error, a closed stream)."""
        with self._lock:
            for request_id in rids:
                self._routes.pop(request_id, None)
                self.engine.abort_request(request_id)

    def _end_call(self, responses: list[Response] | None, error: BaseException | None) -> None:
        """The other ranks of a launcher's group return from their call too."""
        if self.lead is not None:
            self.lead.end_call(responses, error)

    def _submit(self, prompts, kwargs) -> dict[str, ResponseParts]:
        """Validate every prompt before queueing any, so a bad one leaves nothing behind;
        queue them between two steps of another thread's call, never during one."""
        prompts = as_prompt_list(prompts)
        params = GenerateParams.from_kwargs(**kwargs)
        prepared = []
        for prompt in prompts:
            ids = encode_prompt(self.tokenizer, prompt)
            sampling = params.to_sampling_params(len(ids), self.engine.max_model_len)
            prepared.append((prompt, ids, sampling))
        pending: dict[str, ResponseParts] = {}
        with self._lock:
            for prompt, ids, sampling in prepared:
                request_id = uuid.uuid4().hex
                self.engine.add_request(request_id, ids, sampling)
                pending[request_id] = _parts(prompt, len(ids), params)
        return pending

    def destroy(self) -> None:
        """Release the model and its KV cache, and stop the tensor-parallel ranks."""
        if self.engine is not None:
            self.engine.close()
        self.engine = None
        self.tokenizer = None


def _delta(out: RequestOutput) -> Response:
    return Response(
        generated_text=out.text,
        prompt_length=out.prompt_length,
        generated_length=out.generated_length,
        finish_reason=out.finish_reason or GenerationFinishReason.NONE,
        token_ids=list(out.token_ids),
    )

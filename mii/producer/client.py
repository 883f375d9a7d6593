"""`Client`: what `mii.serve()` and `mii.client()` return (MII's client, over Redis streams).

    client = mii.client("smollm2-mii-deployment")
    responses = client(["Hello", "DeepSpeed is"], max_new_tokens=32)     # blocking
    client.generate("Hello", streaming_fn=lambda rs: print(rs[0]))      # MII's streaming
    for delta in client.stream("Hello"): ...                            # iterator
    responses = await client.agenerate(["Hello"])                       # asyncio
    async for delta in client.astream("Hello"): ...

Options are `GenerateParams` (MII's names) plus `timeout=` seconds per request and `n=`
choices per prompt (`n` responses each, prompt-major). A prompt is a text, token ids, or a
`mii.producer.submit.Chat` of messages (the worker applies the chat template). Bad options
raise `InvalidRequestError` before anything is queued; a full queue raises `QueueFullError`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator

import redis

from mii.broker_config import wire
from mii.broker_config.connection import CONNECTION_ERRORS, Backoff
from mii.broker_config.connection import connect as redis_connect
from mii.broker_config.keys import DeploymentKeys
from mii.broker_config.wire import ControlMessage
from mii.config import MIIConfig
from mii.errors import InvalidRequestError
from mii.params import GenerateParams
from mii.producer.aio import AsyncClientMixin
from mii.producer.request_set import RequestSet
from mii.producer.submit import SUBMIT_SCRIPT, Prompt, Submission, as_prompt_list, build_requests
from mii.producer.terminate import terminate_deployment
from mii.response import Response

log = logging.getLogger(__name__)


class Client(AsyncClientMixin):
    def __init__(
        self,
        mii_config: MIIConfig,
        redis_url: str | None = None,
        *,
        redis_client=None,
        async_redis_factory: Callable | None = None,
        owner=None,
        delete_responses: bool = True,
    ) -> None:
        """`redis_client` / `async_redis_factory` replace connections made from `redis_url`
        (tests pass fakeredis); `owner` is the launcher's handle on processes it started."""
        super().__init__(redis_url, async_redis_factory)
        self.mii_config = mii_config
        self.deployment_name = mii_config.deployment_name
        self.keys = DeploymentKeys(self.deployment_name)
        self.settings = mii_config.broker
        self.redis_url = redis_url
        self.redis = redis_client if redis_client is not None else redis_connect(redis_url)
        self.delete_responses = delete_responses
        self._owner = owner
        self._submit_script = self.redis.register_script(SUBMIT_SCRIPT)

    # ---- blocking ------------------------------------------------------------------------
    def generate(
        self,
        prompts: Prompt | list[Prompt],
        streaming_fn: Callable[[list[Response]], None] | None = None,
        **kwargs,
    ) -> list[Response]:
        """One `Response` per prompt. With `streaming_fn` (one prompt only, as in MII), the
        function gets `[delta]` for every chunk as it arrives."""
        if streaming_fn is not None:
            return self._generate_streaming(prompts, streaming_fn, kwargs)
        requests = self._submit(prompts, kwargs)
        try:
            for _ in self._follow(requests):
                pass
        finally:
            self._cleanup(requests)
        return requests.responses()

    __call__ = generate

    def stream(self, prompt: Prompt, **kwargs) -> Iterator[Response]:
        """Yield a `Response` per chunk: its new text and token ids; the last one carries
        the finish reason. Closing the iterator early cancels the request."""
        requests = self._submit(self._single(prompt), kwargs)
        try:
            for _, delta in self._follow(requests):
                yield delta
            requests.responses()  # raises the worker's error, if any
        finally:
            self._cleanup(requests)

    def _generate_streaming(self, prompts, streaming_fn, kwargs) -> list[Response]:
        requests = self._submit(self._single(prompts), kwargs)
        try:
            for _, delta in self._follow(requests):
                streaming_fn([delta])
        finally:
            self._cleanup(requests)
        return requests.responses()

    @staticmethod
    def _single(prompts) -> list[Prompt]:
        prompts = as_prompt_list(prompts)
        if len(prompts) != 1:
            raise InvalidRequestError("streaming takes exactly one prompt")
        return prompts

    def _prepare(self, prompts, kwargs: dict, stream: str | None) -> Submission:
        """Validate everything and build the entries; nothing is sent yet."""
        timeout, n = kwargs.pop("timeout", None), kwargs.pop("n", 1)
        prompts = as_prompt_list(prompts)
        params = GenerateParams.from_kwargs(**kwargs)
        messages = build_requests(prompts, params, timeout, n)
        stream = stream or self.keys.requests
        limit = self._depth_limit(stream)
        return Submission(RequestSet(self.keys, messages, params), stream, limit)

    def _submit(self, prompts, kwargs: dict, stream: str | None = None) -> RequestSet:
        sub = self._prepare(prompts, kwargs, stream)
        args = sub.script_args()
        try:
            self._retry(lambda: self._submit_script(keys=[sub.stream], args=args))
        except redis.ResponseError as exc:
            raise sub.refusal(exc) from None
        return sub.requests

    def _depth_limit(self, stream: str) -> int | None:
        if stream == self.keys.bulk:
            return self.settings.max_bulk_depth
        return self.settings.max_queue_depth

    def _follow(self, requests: RequestSet) -> Iterator:
        """Read the response streams until every request ended; yield (request, delta)."""
        while not requests.done:
            requests.check_deadlines()
            streams, block = requests.streams(), requests.block_ms()
            reply = self._retry(lambda s=streams, b=block: self.redis.xread(s, block=b))
            yield from requests.feed(reply)
            failed = requests.failed()
            if failed is not None:
                failed.assembler.response()  # raises its error

    def _cleanup(self, requests: RequestSet) -> None:
        """Cancel what is still running (an error, a timeout, an abandoned stream) and drop
        the response streams this call read."""
        try:
            for request in requests.open():
                self.cancel(request.rid)
            if self.delete_responses:
                self.redis.delete(*[r.key for r in requests.requests])
        except CONNECTION_ERRORS:
            log.warning("could not clean up after requests: Redis unreachable")

    def _retry(self, operation):
        """Run a Redis call, waiting out lost connections for `reconnect_timeout_s`."""
        backoff, give_up = Backoff(), time.monotonic() + self.settings.reconnect_timeout_s
        while True:
            try:
                return operation()
            except CONNECTION_ERRORS:
                if time.monotonic() > give_up:
                    raise
                backoff.sleep()

    # ---- control -------------------------------------------------------------------------
    def cancel(self, request_id: str) -> None:
        """Stop a request wherever it is (queued or generating); its KV blocks are freed
        and its stream ends with finish_reason CANCELLED."""
        self.cancel_many([request_id])

    def cancel_many(self, request_ids: list[str]) -> None:
        """`cancel` for several requests in one round trip."""
        pipe = self.redis.pipeline(transaction=True)
        for request_id in request_ids:
            pipe.set(self.keys.cancelled(request_id), 1, ex=self.settings.response_ttl_s)
            fields = wire.control_fields(ControlMessage(op="cancel", rid=request_id))
            pipe.xadd(
                self.keys.control, fields, maxlen=self.settings.control_maxlen, approximate=True
            )
        pipe.execute()

    def terminate_server(self, timeout_s: float = 60.0) -> None:
        """Stop the deployment's workers (every host), forget the deployment, and stop its
        Redis if `mii.serve` started one."""
        terminate_deployment(self.redis, self.keys, self.settings, self._owner, timeout_s)

    def close(self) -> None:
        self.redis.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def connect(model_or_deployment_name: str, redis_url: str | None = None, **kwargs) -> Client:
    """What `mii.client(name)` calls: a `Client` for a running deployment (see
    `mii.producer.connect` for how its Redis is found)."""
    from mii.producer.connect import connect_deployment

    return connect_deployment(model_or_deployment_name, redis_url, **kwargs)

"""`Client`: what `mii.serve()` and `mii.client()` return (MII's client, over Redis streams).

    client = mii.client("smollm2-mii-deployment")
    responses = client(["Hello", "DeepSpeed is"], max_new_tokens=32)     # blocking
    client.generate("Hello", streaming_fn=lambda rs: print(rs[0]))      # MII's streaming
    for delta in client.stream("Hello"): ...                            # iterator
    responses = await client.agenerate(["Hello"])                       # asyncio
    async for delta in client.astream("Hello"): ...

Options are `GenerateParams` (MII's names) plus `timeout=` seconds per request (default
`broker.request_timeout_s`; `timeout=None`: no deadline) and `n=` choices per prompt (`n`
responses each, prompt-major). A prompt is a text, token ids, or a
`mii.producer.submit.Chat` of messages (the worker applies the chat template). Bad options
and prompts raise `InvalidRequestError` before anything is queued; a full queue raises
`QueueFullError`; a failed deployment `DeploymentFailedError`; a request that vanished
from Redis (flushed, or restarted without persistence) `RequestLostError`; a Redis
unreachable for longer than `broker.reconnect_timeout_s` `BrokerUnavailableError`, and
what the call abandoned is cancelled once Redis answers again. No call waits forever
unless asked to.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence

import redis

from mii.broker_config.connection import CONNECTION_ERRORS, retry_until
from mii.broker_config.connection import connect as redis_connect
from mii.broker_config.keys import DeploymentKeys
from mii.config import MIIConfig
from mii.errors import BrokerUnavailableError, InvalidRequestError
from mii.params import GenerateParams
from mii.producer.aio import AsyncClientMixin
from mii.producer.liveness import ClientLiveness
from mii.producer.outage import Abandoned, broker_unavailable, queue_cancels
from mii.producer.presence import PresenceCheck
from mii.producer.request_set import PendingRequest, RequestSet
from mii.producer.submit import (
    SUBMIT_SCRIPT,
    Prompt,
    Submission,
    Timeout,
    as_prompt_list,
    build_requests,
    check_prompt_size,
    request_timeout,
)
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
        self.keys = DeploymentKeys(self.deployment_name, mii_config.broker.partitions)
        self.settings = mii_config.broker
        self.redis_url = redis_url
        self.redis = redis_client if redis_client is not None else redis_connect(redis_url)
        self.delete_responses = delete_responses
        self._owner = owner
        self._submit_script = self.redis.register_script(SUBMIT_SCRIPT)
        self.max_request_bytes = self.settings.prompt_byte_limit(mii_config.model_conf.max_length)
        """Largest prompt this client submits (UTF-8 bytes, or 4 per token id)."""
        self._liveness = ClientLiveness(self.keys, self.settings.client_timeout_s)
        self._presence = PresenceCheck(self.keys, self.settings.lost_request_grace_s)
        self._abandoned = Abandoned()

    # ---- blocking ------------------------------------------------------------------------
    def submit(self, prompts: Prompt | list[Prompt], **kwargs) -> Generation:
        """Queue one request per prompt and return at once; the `Generation` follows them
        (`wait()`, or iterate over `(request, delta)` as chunks arrive) or cancels them."""
        return Generation(self, self._submit(prompts, kwargs))

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

    def _prepare(self, prompts, kwargs: dict, stream: str | None, reply: str) -> Submission:
        """Validate everything and build the entries; nothing is sent yet. Their chunks
        will arrive on the reply stream `reply`."""
        kwargs = dict(kwargs)
        timeout = kwargs.pop("timeout", Timeout.DEFAULT)
        timeout_s = request_timeout(timeout, self.settings.request_timeout_s)
        n = kwargs.pop("n", 1)
        prompts = as_prompt_list(prompts)
        params = GenerateParams.from_kwargs(**kwargs)
        for i, prompt in enumerate(prompts):
            check_prompt_size(prompt, self.max_request_bytes, i if len(prompts) > 1 else None)
        partition = self.keys.partition(reply)
        messages = build_requests(prompts, params, timeout_s, n, reply,
                                  lambda: self.keys.new_id(partition))  # fmt: skip
        stream = stream or self.keys.requests_of(reply)
        requests = RequestSet(self.keys, messages, params, reply)
        limit = self._depth_limit(stream)
        return Submission(requests, stream, limit, self.keys, self._liveness.ttl_s)

    def _submit(self, prompts, kwargs: dict, stream: str | None = None) -> RequestSet:
        sub = self._prepare(prompts, kwargs, stream, reply=self.keys.new_id())  # this call's
        keys, args = sub.script_keys(), sub.script_args()
        if sub.checked_apart:
            pipe = sub.precheck(self.redis.pipeline(transaction=False))
            sub.prechecked(self._call(pipe.execute))
        try:
            ids = self._call(lambda: self._submit_script(keys=keys, args=args), sub.rids())
        except redis.ResponseError as exc:
            raise sub.refusal(exc) from None
        self._liveness.refreshed()
        return sub.accepted(ids)

    def _depth_limit(self, stream: str) -> int | None:
        """The stream's limit: the bulk stream's, or a partition's share of the queue's."""
        if stream == self.keys.bulk:
            return self.settings.max_bulk_depth
        limit = self.settings.max_queue_depth
        return None if limit is None else -(-limit // self.keys.partitions)

    def _follow(self, requests: RequestSet) -> Iterator:
        """Read the response streams until every request ended; yield (request, delta)."""
        while not requests.done:
            requests.check_deadlines()
            self._upkeep(requests)
            streams, block = requests.streams(), self._block_ms(requests)
            reply = self._call(lambda s=streams, b=block: self.redis.xread(s, block=b))
            yield from requests.feed(reply)
            failed = requests.failed()
            if failed is not None:
                failed.assembler.response()  # raises its error

    def _block_ms(self, requests: RequestSet) -> int:
        return requests.block_ms(self._presence.grace_s, self._liveness.next_due())

    def _upkeep(self, requests: RequestSet) -> None:
        """Between reads: refresh this client's liveness key, ask after silent requests."""
        if self._liveness.due():
            key, ttl = self._liveness.key, self._liveness.ttl_s
            self._call(lambda: self.redis.set(key, 1, ex=ttl))
        suspects = self._presence.suspects(requests)
        if suspects:
            replies = self._call(
                lambda: self._presence.queue(self.redis.pipeline(False), suspects).execute()
            )
            self._presence.judge(suspects, replies)

    def _cleanup(self, requests: RequestSet) -> None:
        """Cancel what is still running (an error, a timeout, an abandoned stream) and drop
        the reply stream this call read."""
        delete = [requests.key] if self.delete_responses else []
        self._cancel_now([r.rid for r in requests.open()], delete)

    def _cancel_pipe(self, pipe, rids: list[str], delete: Sequence[str]):
        """`pipe` with the cancels of `rids` and the deletion of the keys in `delete`."""
        queue_cancels(pipe, self.keys, self.settings, rids)
        if delete:
            pipe.delete(*delete)
        return pipe

    def _cancel_now(self, rids: Iterable[str], delete: Sequence[str] = ()) -> None:
        """Cancel `rids` and the abandoned requests in one try; what fails is owed."""
        rids = [*rids, *self._abandoned.take()]
        try:
            self._cancel_pipe(self.redis.pipeline(False), rids, delete).execute()
        except CONNECTION_ERRORS:
            self._abandoned.add(rids)
            log.warning("Redis unreachable: %d request(s) will be cancelled later", len(rids))

    def _call(self, operation, abandon: Iterable[str] = ()):
        """Run a Redis call, waiting out lost connections for `reconnect_timeout_s`; past
        that, `BrokerUnavailableError`, and the requests in `abandon` are owed a cancel."""
        try:
            result = retry_until(operation, self.settings.reconnect_timeout_s)
        except CONNECTION_ERRORS as exc:
            raise self._gave_up(exc, abandon) from exc
        if self._abandoned:
            self._cancel_now(())
        return result

    def _gave_up(self, exc: BaseException, abandon: Iterable[str]) -> BrokerUnavailableError:
        self._abandoned.add(abandon)
        return broker_unavailable(exc, [self.redis_url], self.settings.reconnect_timeout_s)

    # ---- control -------------------------------------------------------------------------
    def cancel(self, request_id: str) -> None:
        """Stop a request wherever it is (queued or generating); its KV blocks are freed
        and its stream ends with finish_reason CANCELLED."""
        self.cancel_many([request_id])

    def cancel_many(self, request_ids: list[str]) -> None:
        """`cancel` for several requests in one round trip."""
        rids = list(request_ids)
        self._call(lambda: self._cancel_pipe(self.redis.pipeline(False), rids, []).execute(), rids)

    def terminate_server(self, timeout_s: float = 60.0) -> None:
        """Stop the deployment's workers (every host), forget the deployment, and stop its
        Redis if `mii.serve` started one."""
        terminate_deployment(self.redis, self.keys, self.settings, self._owner, timeout_s)

    def close(self) -> None:
        """Send the cancels still owed (one try), then close the connection."""
        if self._abandoned:
            self._cancel_now(())
        self.redis.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Generation:
    """Requests that `Client.submit` queued: iterate over `(request, delta)` pairs as their
    chunks arrive, `wait()` for their responses, or `cancel()` them. `requests` has each
    one's id (`.rid`) and response stream (`.key`)."""

    def __init__(self, client: Client, requests: RequestSet) -> None:
        self.client, self._set = client, requests

    @property
    def requests(self) -> list[PendingRequest]:
        return self._set.requests

    @property
    def request_ids(self) -> list[str]:
        return [r.rid for r in self._set.requests]

    def __iter__(self) -> Iterator[tuple[PendingRequest, Response]]:
        """Deltas until every request ended; raises a request's error as it arrives."""
        return self.client._follow(self._set)

    def wait(self) -> list[Response]:
        """Every response, once all ended (cancelling the rest if one fails)."""
        try:
            for _ in self:
                pass
        finally:
            self.client._cleanup(self._set)
        return self.responses()

    def responses(self) -> list[Response]:
        """The responses so far complete; raises the error of a request that failed."""
        return self._set.responses()

    def cancel(self) -> None:
        self.client.cancel_many([r.rid for r in self._set.open()])

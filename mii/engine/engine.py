"""LLMEngine: continuous batching over a paged KV cache; one `step()` is one forward pass."""

from __future__ import annotations

import random
from collections.abc import Sequence as SequenceType
from dataclasses import dataclass
from typing import Any

from mii.constants import GenerationFinishReason
from mii.engine.block_manager import BlockManager
from mii.engine.config import EngineConfig, parse_dtype
from mii.engine.detokenizer import IncrementalDetokenizer
from mii.engine.loader import eos_token_ids, load_hf_config, load_tokenizer, model_folder
from mii.engine.models.family import shared_window
from mii.engine.outputs import RequestOutput, TokenLogprob
from mii.engine.sampler import Sampler, SamplerOutput
from mii.engine.sampling_params import SamplingParams
from mii.engine.scheduler import Scheduler
from mii.engine.sequence import Sequence
from mii.engine.tp.context import SINGLE, ParallelContext
from mii.engine.tp.leader import make_runner
from mii.errors import InvalidRequestError

WARM_UP_ID = "__warm_up__/"
"""The request ids of `LLMEngine.warm_up` start with this."""
WARM_UP_NEW_TOKENS = 4


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_blocks_total: int
    kv_blocks_free: int
    tokens_generated: int
    """Tokens generated since the engine started."""
    prompt_tokens_processed: int
    steps: int


@dataclass(frozen=True)
class _Launched:
    """A step started on the device whose samples are not read yet."""

    samples: SamplerOutput | None
    sampling: list[Sequence]
    """The sequences that sample, in the samples' order."""
    indices: list[int]
    """Where each one's sample goes in its tokens (a PENDING token until it is read)."""
    host: SamplerOutput | None
    """The samples on their way to host memory ..."""
    copied: Any = None
    """... and the CUDA event that marks them arrived (None on the CPU)."""


class _Request:
    """A sequence with what only the engine's front half needs: its detokenizer."""

    def __init__(self, seq: Sequence, detokenizer: IncrementalDetokenizer | None) -> None:
        self.seq = seq
        self.detokenizer = detokenizer
        self.emitted = seq.num_generated  # generated tokens already reported


def max_context(hf_config: Any) -> int:
    """The longest context the model attends over correctly (sliding windows included)."""
    return getattr(hf_config, "max_position_embeddings", None) or 2048


class LLMEngine:
    def __init__(
        self,
        config: EngineConfig,
        tp: ParallelContext = SINGLE,
        random_weights: bool = False,
        load_tokenizer_files: bool = True,
    ) -> None:
        self.config = config
        random_weights = random_weights or config.load_format == "dummy"
        path = model_folder(config.model, config.revision, weights=not random_weights)
        self.hf_config = load_hf_config(path)
        self.tokenizer = None
        if load_tokenizer_files and not config.skip_tokenizer_init:
            self.tokenizer = load_tokenizer(self._tokenizer_folder(path))
        model_len = config.max_model_len or max_context(self.hf_config)
        # With tensor_parallel > 1 this process is rank 0 and starts the other ranks.
        self.runner = make_runner(
            config, self.hf_config, path, self._dtype(), model_len, tp, random_weights
        )
        self.runner.sampler = Sampler(eos_token_ids(path, self.hf_config, self.tokenizer))
        self.eos_token_ids = frozenset(self.runner.sampler.eos_token_ids)
        window = shared_window(self.hf_config)
        self._window_blocks = _blocks_per_window(window, config)
        if self._window_blocks is not None and self._window_blocks <= self.runner.num_blocks:
            self.max_model_len = model_len  # a sequence holds only its window's blocks
        else:
            self.max_model_len = min(model_len, self.runner.num_blocks * config.cache.block_size)
        self.vocab_size = self.hf_config.vocab_size
        long_rope = getattr(self.runner.model, "long_prompt_rope", None)
        self.block_manager = BlockManager(
            self.runner.num_blocks,
            config.cache.block_size,
            # LongRoPE turns the same tokens two ways (short and long sequences): no sharing
            config.cache.enable_prefix_caching and long_rope is None,
            sliding_window=window,
        )
        self.scheduler = Scheduler(
            config.scheduler, self.block_manager, long_rope and long_rope.original
        )
        self.requests: dict[str, _Request] = {}
        self._arrivals = 0
        self._rng = random.Random()
        self._tokens_generated = self._prompt_tokens = self._steps = 0
        use_async = config.async_scheduling
        self._async = self.runner.device.type == "cuda" if use_async is None else use_async
        self._inflight: _Launched | None = None
        self._needs_history: set[str] = set()  # requests with a penalty
        warm = config.warm_up
        if warm or (warm is None and self.runner.device.type == "cuda"):
            self.warm_up()

    def _tokenizer_folder(self, model_path: str) -> str:
        name = self.config.tokenizer
        if name in (None, self.config.model, model_path):
            return model_path
        return model_folder(name, weights=False)

    def _dtype(self):
        if self.config.dtype != "auto":
            return parse_dtype(self.config.dtype)
        if self.config.torch_device.type == "cpu":
            return parse_dtype("float32")
        stored = getattr(self.hf_config, "dtype", None) or getattr(
            self.hf_config, "torch_dtype", None
        )
        dtype = parse_dtype(str(stored)) if stored else parse_dtype("bfloat16")
        return parse_dtype("bfloat16") if dtype == parse_dtype("float32") else dtype

    def warm_up(self) -> None:
        """Run a few throwaway requests to the end: prompts alone at 1, 3, 16, 17 and 40
        tokens, then prompt chunks (a short one, and one of the whole token budget) beside
        running decodes. Triton compiles a kernel on its first call at each tile choice and
        argument alignment (a step of the ragged attention's 16-, 64- and 128-row tiles,
        token counts that are or are not multiples of 16, decodes apart from prompt chunks),
        half a second or more each; here those compiles happen before any client waits on
        them. Afterwards the engine holds nothing: no request, no cached prefix, its counters
        at zero."""
        if self.requests:
            raise RuntimeError("warm_up runs on an engine without requests")
        rng = random.Random(0)
        budget = self.config.scheduler.max_num_batched_tokens
        longest = max(1, min(budget, self.max_model_len - WARM_UP_NEW_TOKENS - 1))

        def add(name: str, length: int) -> None:
            ids = [rng.randrange(self.vocab_size) for _ in range(max(1, min(length, longest)))]
            params = SamplingParams(max_new_tokens=WARM_UP_NEW_TOKENS, ignore_eos=True)
            self.add_request(f"{WARM_UP_ID}{name}", ids, params)

        def drain() -> None:  # with asynchronous scheduling, to its surplus step's end too
            while self.has_unfinished_requests() or self._inflight is not None:
                self.step()

        for length in (1, 3, 16, 17, 40):
            add(f"alone-{length}", length)
            drain()
        add("running", 5)
        self.step()
        self.step()  # its decodes run beside the chunks below
        add("short", 3)
        add("budget", budget)
        drain()
        self.block_manager.forget_cached_prefixes()
        self._tokens_generated = self._prompt_tokens = self._steps = 0

    # ---- requests ----------------------------------------------------------------------
    def add_request(
        self,
        request_id: str,
        prompt_token_ids: SequenceType[int],
        params: SamplingParams,
        generated_token_ids: SequenceType[int] = (),
    ) -> None:
        """Queue a request. `generated_token_ids` resumes one that another worker began."""
        self._validate(request_id, prompt_token_ids, params, generated_token_ids)
        seed = params.seed if params.seed is not None else self._rng.getrandbits(63)
        seq = Sequence(
            request_id, prompt_token_ids, params, self._arrivals, generated_token_ids, seed
        )
        self._arrivals += 1
        detok = None
        if self.tokenizer is not None:
            detok = IncrementalDetokenizer(self.tokenizer, params.stop, generated_token_ids)
        self.requests[request_id] = _Request(seq, detok)
        if params.needs_history:
            self._needs_history.add(request_id)
        self.scheduler.add(seq)

    def _validate(self, request_id, prompt, params: SamplingParams, generated) -> None:
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in the engine")
        if len(prompt) == 0:
            raise InvalidRequestError("prompt is empty")
        total = len(prompt) + len(generated)
        if total >= self.max_model_len:
            raise InvalidRequestError(
                f"prompt is {total} tokens; the model's context is {self.max_model_len} tokens"
            )
        self._check_ids("prompt", (*prompt, *generated))
        self._check_ids("stop_token_ids", params.stop_token_ids)
        self._check_ids("logit_bias", [t for t, _ in params.logit_bias])
        if params.max_new_tokens < 1:
            raise InvalidRequestError("max_new_tokens must be at least 1")
        if params.stop and self.tokenizer is None:
            raise InvalidRequestError("stop strings need a tokenizer; this model runs without")

    def _check_ids(self, field: str, ids) -> None:
        """Every id the engine indexes with must be inside the vocabulary."""
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise InvalidRequestError(
                f"{field}: token ids outside the vocabulary of {self.vocab_size}: {bad[:5]}"
            )

    def abort_request(self, request_id: str) -> bool:
        """Drop a request and free its KV blocks; False when it is not here."""
        req = self.requests.get(request_id)
        if req is None:
            return False
        self._forget(req.seq)
        return True

    def _forget(self, seq: Sequence) -> None:
        """Take a finished or aborted request out. Its blocks are free for later steps: a
        step still running that writes to them runs before those on the device's stream."""
        self.requests.pop(seq.request_id)
        self._needs_history.discard(seq.request_id)
        self.scheduler.remove(seq)

    def close(self) -> None:
        """Stop the tensor-parallel ranks this engine started (a no-op for one process)."""
        self.runner.close()

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def can_admit(self, num_prompt_tokens: int) -> bool:
        """Whether a new prompt of this length fits beside the work already queued."""
        if len(self.requests) >= self.config.scheduler.max_num_seqs:
            return False
        queued = sum(self._blocks_held(s.num_tokens) for s in self.scheduler.waiting)
        return queued + self._blocks_held(num_prompt_tokens) <= self.block_manager.num_free_blocks

    def _blocks_held(self, num_tokens: int) -> int:
        """The most blocks a sequence of this many tokens holds at once."""
        blocks = -(-num_tokens // self.config.cache.block_size)
        return blocks if self._window_blocks is None else min(blocks, self._window_blocks)

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            kv_blocks_total=self.block_manager.num_blocks,
            kv_blocks_free=self.block_manager.num_free_blocks,
            tokens_generated=self._tokens_generated,
            prompt_tokens_processed=self._prompt_tokens,
            steps=self._steps,
        )

    # ---- the step ----------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule, run one forward pass, then turn the samples into outputs.

        With asynchronous scheduling each call launches the next step before it reads the
        samples of the one launched by the call before, and returns those: the host
        schedules while the device computes. A sequence that finishes has then run one
        step too many; that sample is dropped."""
        if not self._overlaps():
            if self._inflight is not None:  # a request that needs sync mode arrived
                return self._complete(self._take_inflight())
            launched = self._launch(None)
            return [] if launched is None else self._complete(launched)
        if self._inflight is None:
            self._inflight = self._launch(None)
            if self._inflight is None:
                return []
        previous = self._take_inflight()
        self._inflight = self._launch(previous)
        return self._complete(previous)

    def _overlaps(self) -> bool:
        return self._async and not self._needs_history

    def _take_inflight(self) -> _Launched:
        launched, self._inflight = self._inflight, None
        return launched

    def _launch(self, previous: _Launched | None) -> _Launched | None:
        """Schedule a step and start it; its samples stay on the device (PENDING tokens)."""
        schedule = self.scheduler.schedule()
        if not schedule.chunks:
            return None
        rows = None
        if previous is not None and previous.samples is not None:
            rows = {id(seq): row for row, seq in enumerate(previous.sampling)}
        samples = self.runner.run(schedule.chunks, previous and previous.samples, rows)
        self.scheduler.finish_step(schedule)
        self._steps += 1
        sampling = [c.seq for c in schedule.chunks if c.samples]
        self._prompt_tokens += schedule.num_tokens - len(sampling)
        indices = [seq.append_pending() for seq in sampling]
        host, copied = samples.to_host() if samples is not None else (None, None)
        return _Launched(samples, sampling, indices, host, copied)

    def _complete(self, launched: _Launched) -> list[RequestOutput]:
        """Read a launched step's samples back and turn them into outputs."""
        if launched.samples is None:
            return []
        if launched.copied is not None:
            launched.copied.synchronize()  # the step's one wait for the device
        self.runner.check_step()
        token_ids = launched.host.token_ids.tolist()
        logprobs = _logprob_rows(launched.host, token_ids)
        outputs = []
        rows = zip(launched.sampling, launched.indices, token_ids, logprobs, strict=True)
        for seq, index, token_id, lp in rows:
            seq.resolve(index, token_id)
            if seq.finished:  # finished or aborted while this step ran: a surplus sample
                continue
            self.block_manager.seal_computed_blocks(seq)
            self._tokens_generated += 1
            outputs.append(self._output(self.requests[seq.request_id], token_id, lp, index))
        return outputs

    def _output(
        self, req: _Request, token_id: int, logprob: TokenLogprob | None, index: int
    ) -> RequestOutput:
        """The output of the token at `index` of the request's sequence."""
        seq = req.seq
        generated = index + 1 - seq.num_prompt_tokens
        reason = self._finish_reason(seq, token_id, generated, index + 1)
        text = ""
        if req.detokenizer is not None:
            req.detokenizer.add_token(token_id)
            if reason is None and req.detokenizer.stopped:
                reason = GenerationFinishReason.STOP
            text = req.detokenizer.take(finished=reason is not None)
        first_index = req.emitted
        req.emitted = generated
        if reason is not None:
            seq.finish_reason = reason
            self._forget(seq)
        return RequestOutput(
            request_id=seq.request_id,
            token_ids=(token_id,),
            text=text,
            first_token_index=first_index,
            prompt_length=seq.num_prompt_tokens,
            generated_length=generated,
            finished=reason is not None,
            finish_reason=reason,
            logprobs=None if logprob is None or seq.params.logprobs is None else (logprob,),
        )

    def _finish_reason(
        self, seq: Sequence, token_id: int, generated: int, num_tokens: int
    ) -> GenerationFinishReason | None:
        """Whether the token that makes `generated` generated (`num_tokens` in all) ends it."""
        params = seq.params
        may_stop = generated > params.min_new_tokens
        if may_stop and not params.ignore_eos and token_id in self.eos_token_ids:
            return GenerationFinishReason.STOP
        if may_stop and token_id in params.stop_token_ids:
            return GenerationFinishReason.STOP
        if generated >= params.max_new_tokens or num_tokens >= self.max_model_len:
            return GenerationFinishReason.LENGTH
        return None


def _blocks_per_window(window: int | None, config: EngineConfig) -> int | None:
    """With a sliding window on every layer, the most blocks one sequence holds: its
    window and one step's tokens, a partial block at each end, one block not yet hashed
    (the block manager releases only hashed ones). None without such a window."""
    if window is None:
        return None
    tokens = window + config.scheduler.max_num_batched_tokens
    return -(-tokens // config.cache.block_size) + 3


def _logprob_rows(samples: SamplerOutput, token_ids: list[int]) -> list[TokenLogprob | None]:
    n = len(token_ids)
    if samples.logprobs is None:
        return [None] * n
    chosen = samples.logprobs.tolist()
    ids = samples.top_ids.tolist() if samples.top_ids is not None else [[]] * n
    vals = samples.top_logprobs.tolist() if samples.top_logprobs is not None else [[]] * n
    return [
        TokenLogprob(t, lp, tuple(zip(i, v, strict=True)))
        for t, lp, i, v in zip(token_ids, chosen, ids, vals, strict=True)
    ]

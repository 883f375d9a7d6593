"""A fast, deterministic stand-in for `LLMEngine` (same interface), for the worker's unit
tests and the broker-only benchmark.

Token k of a request is a lowercase letter fixed by the prompt and k, so any worker that
resumes a request after k tokens continues exactly where another left off. A byte-level
tokenizer keeps text and ids trivially related.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field

from mii.constants import GenerationFinishReason
from mii.engine.outputs import RequestOutput
from mii.errors import InvalidRequestError

POISON = "POISON"  # a prompt containing this makes step() raise, like a crashing kernel
FATAL = "FATAL"  # ... raise what a broken device raises (the engine cannot go on)
HANG = "HANG"  # ... never return from step(), like a GPU kernel that spins forever
SLOW = "SLOW"  # a prompt containing this takes `slow_tokenize_s` to tokenize


class ByteTokenizer:
    eos_token_id = None

    def __init__(self, slow_tokenize_s: float = 0.0) -> None:
        self.slow_tokenize_s = slow_tokenize_s

    def encode(self, text: str) -> list[int]:
        if SLOW in text:
            time.sleep(self.slow_tokenize_s)  # like a fast tokenizer: the GIL is free
        return list(text.encode())

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return bytes(ids).decode(errors="replace")


def token_for(prompt: list[int], index: int) -> int:
    return ord("a") + (sum(prompt) * 31 + index * 7) % 26


def expected_text(prompt: str, n: int) -> str:
    ids = list(prompt.encode())
    return "".join(chr(token_for(ids, k)) for k in range(n))


@dataclass
class _Request:
    prompt: list[int]
    params: object
    generated: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class FakeStats:
    num_running: int
    kv_blocks_free: int


class FakeEngine:
    def __init__(
        self,
        max_model_len: int = 4096,
        capacity_tokens: int = 1 << 20,
        max_num_seqs: int = 256,
        step_delay_s: float = 0.0,
        slow_tokenize_s: float = 0.0,
    ) -> None:
        self.tokenizer = ByteTokenizer(slow_tokenize_s)
        self.max_model_len = max_model_len
        self.capacity_tokens = capacity_tokens
        self.max_num_seqs = max_num_seqs
        self.step_delay_s = step_delay_s
        self.requests: dict[str, _Request] = {}
        self.added: list[str] = []
        self.aborted: list[str] = []
        self.resumed_from: dict[str, int] = {}
        self.steps = 0

    def add_request(self, request_id, prompt_token_ids, params, generated_token_ids=()):
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already in the engine")
        if len(prompt_token_ids) + len(generated_token_ids) >= self.max_model_len:
            raise InvalidRequestError("prompt is longer than the model's context")
        self.requests[request_id] = _Request(
            list(prompt_token_ids), params, list(generated_token_ids)
        )
        self.added.append(request_id)
        self.resumed_from[request_id] = len(generated_token_ids)

    def abort_request(self, request_id) -> bool:
        self.aborted.append(request_id)
        return self.requests.pop(request_id, None) is not None

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def close(self) -> None:
        self.requests.clear()

    def used_tokens(self) -> int:
        return sum(len(r.prompt) + len(r.generated) for r in self.requests.values())

    def can_admit(self, num_prompt_tokens: int) -> bool:
        if len(self.requests) >= self.max_num_seqs:
            return False
        return self.used_tokens() + num_prompt_tokens <= self.capacity_tokens

    def stats(self) -> FakeStats:
        return FakeStats(len(self.requests), self.capacity_tokens - self.used_tokens())

    def step(self) -> list[RequestOutput]:
        if self.step_delay_s:
            time.sleep(self.step_delay_s)
        self.steps += 1
        if any(HANG.encode() in bytes(r.prompt) for r in self.requests.values()):
            threading.Event().wait()  # stuck for good: only the worker's watchdog ends it
        outputs = [self._advance(rid, req) for rid, req in list(self.requests.items())]
        return outputs

    def _advance(self, rid: str, req: _Request) -> RequestOutput:
        if POISON.encode() in bytes(req.prompt):
            raise RuntimeError(f"poisoned request {rid}")
        if FATAL.encode() in bytes(req.prompt):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        index = len(req.generated)
        token = token_for(req.prompt, index)
        req.generated.append(token)
        done = len(req.generated) >= req.params.max_new_tokens
        if done:
            del self.requests[rid]
        return RequestOutput(
            request_id=rid,
            token_ids=(token,),
            text=chr(token),
            first_token_index=index,
            prompt_length=len(req.prompt),
            generated_length=len(req.generated),
            finished=done,
            finish_reason=GenerationFinishReason.LENGTH if done else None,
        )


def make_fake_engine(mii_config, replica: int) -> FakeEngine:
    """Engine factory for worker processes (`--engine-factory`); MII_FAKE_STEP_DELAY sets
    the simulated forward-pass time in seconds, MII_FAKE_LOAD_DELAY a model load's."""
    time.sleep(float(os.environ.get("MII_FAKE_LOAD_DELAY", "0")))
    delay = float(os.environ.get("MII_FAKE_STEP_DELAY", "0"))
    max_len = mii_config.model_conf.max_length or 4096
    return FakeEngine(max_model_len=max_len, step_delay_s=delay)

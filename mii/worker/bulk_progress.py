"""What a worker adds to a bulk job's record while its lines run, beside their results
(`bulk_results`): the tokens each step generated for the job (the `streamed` counter, so
that a progress bar counts tokens as they come, not only as lines end), and each line's
log-probabilities when it asked for them (its result carries them, for OpenAI's output).

    streamed = streamed_tokens(batch.outputs, job_of)       # job id -> tokens this step
    commands += streamed_commands(keys, streamed)             # one script call per job
    log.add(out, tokenizer)  ...  log.pop(rid)                # result_payload(..., **fields)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from mii.broker_config.jobs import STREAMED_SCRIPT
from mii.broker_config.keys import DeploymentKeys
from mii.engine.outputs import RequestOutput


def streamed_tokens(
    outputs: Iterable[RequestOutput], job_of: Callable[[str], str | None]
) -> dict[str, int]:
    """Tokens generated per bulk job in these outputs (`job_of`: a request's job, if any)."""
    tokens: dict[str, int] = {}
    for out in outputs:
        job = job_of(out.request_id)
        if job is not None and out.token_ids:
            tokens[job] = tokens.get(job, 0) + len(out.token_ids)
    return tokens


def streamed_commands(keys: DeploymentKeys, tokens: dict[str, int]) -> list[tuple]:
    """Pipeline commands adding each job's tokens to its `streamed` counter."""
    return [
        ("eval", STREAMED_SCRIPT, 1, keys.job(job).meta, count)
        for job, count in tokens.items()
        if count
    ]


@dataclass
class _Logprobs:
    ids: list[int] = field(default_factory=list)
    lp: list[float] = field(default_factory=list)
    toks: list[str] = field(default_factory=list)
    top: list[list[tuple[int, float, str]]] = field(default_factory=list)
    touched: float = 0.0


class LogprobLog:
    """The log-probabilities of the lines that asked for them, token by token, until each
    line's result is recorded. Token texts come from the engine's tokenizer (decoded here,
    in the publisher's thread), or read `token_id:<id>` without one."""

    def __init__(self, tokenizer=None) -> None:
        self.tokenizer = tokenizer
        self._held: dict[str, _Logprobs] = {}

    def add(self, out: RequestOutput) -> None:
        if not out.logprobs:
            return
        held = self._held.setdefault(out.request_id, _Logprobs())
        held.touched = time.monotonic()
        for lp in out.logprobs:
            held.ids.append(lp.token_id)
            held.lp.append(lp.logprob)
            held.toks.append(self._text(lp.token_id))
            held.top.append([(t, v, self._text(t)) for t, v in lp.top])

    def pop(self, rid: str) -> dict:
        """`result_payload` fields of a line's log-probabilities ({} when it asked none)."""
        held = self._held.pop(rid, None)
        if held is None:
            return {}
        return {"ids": held.ids, "lp": held.lp, "toks": held.toks, "top": held.top}

    def forget(self, rids: Iterable[str]) -> None:
        for rid in rids:
            self._held.pop(rid, None)

    def sweep(self, older_than_s: float = 600.0) -> None:
        """Forget lines this worker stopped serving without an ending (taken over)."""
        limit = time.monotonic() - older_than_s
        for rid in [r for r, held in self._held.items() if held.touched < limit]:
            del self._held[rid]

    def _text(self, token_id: int) -> str:
        if self.tokenizer is None:
            return f"token_id:{token_id}"
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

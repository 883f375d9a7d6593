"""Batched sampling on the logits' device: one pass for all requests of a step.

Randomness is a counter-based hash of (request seed, token index, vocabulary id), so a
request's sample depends on nothing else in the batch: the same seed and options give the
same text whatever runs beside it, after a preemption, or on another worker that resumes
it. Sampling draws Gumbel noise from that hash (the Gumbel-max trick), which needs no
host synchronisation and no per-request generator.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from dataclasses import dataclass

import torch

from mii.engine.sequence import Sequence

_M32 = 0xFFFFFFFF
_ROW_CHUNK = 64  # rows hashed at a time, to bound the (rows, vocab) int64 scratch


@dataclass(frozen=True)
class SamplerOutput:
    token_ids: torch.Tensor  # (N,) int64
    logprobs: torch.Tensor | None = None  # (N,) float32, chosen token
    top_ids: torch.Tensor | None = None  # (N, k) int64
    top_logprobs: torch.Tensor | None = None  # (N, k) float32

    def to_host(self) -> tuple[SamplerOutput, torch.cuda.Event | None]:
        """Start copying to host memory now, right behind the step on the stream, and the
        event that marks the copy done. (A plain `.tolist()` later would queue behind
        whatever was launched since: the next step, with asynchronous scheduling.)"""
        if self.token_ids.device.type != "cuda":
            return self, None
        fields = (getattr(self, f.name) for f in dataclasses.fields(self))  # no deep copies
        host = SamplerOutput(*(_to_host(t) for t in fields))
        done = torch.cuda.Event()
        done.record()
        return host, done


def _to_host(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.to("cpu", non_blocking=True)  # into pinned memory


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 integer hash on int64 tensors holding 32-bit values."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _M32
    return x ^ (x >> 16)


def gumbel_noise(seeds: torch.Tensor, counters: torch.Tensor, vocab: int) -> torch.Tensor:
    """(N, vocab) float32 Gumbel(0, 1) noise, a pure function of (seed, counter, column)."""
    key = _mix32(_mix32(_mix32(seeds & _M32) ^ ((seeds >> 32) & _M32)) ^ (counters & _M32))
    key2 = _mix32(key ^ 0x5BD1E995)
    cols = torch.arange(vocab, device=seeds.device, dtype=torch.int64) * 0x9E3779B1
    bits = _mix32(((key[:, None] + cols[None, :]) & _M32) ^ key2[:, None])
    uniform = ((bits >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))  # in (0, 1)
    return -torch.log(-torch.log(uniform))


def _column(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Per-request values as a device tensor. Through pinned memory: a copy from pageable
    memory would wait for the stream, which holds the host back from scheduling ahead."""
    column = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return column
    return column.pin_memory().to(device, non_blocking=True)


class Sampler:
    def __init__(self, eos_token_ids: Collection[int]) -> None:
        self.eos_token_ids = tuple(eos_token_ids)

    def __call__(self, logits: torch.Tensor, seqs: list[Sequence]) -> SamplerOutput:
        """logits: (N, V) float32, one row per sequence that samples this step."""
        raw = logits
        logits = self._apply_penalties(logits, seqs)
        token_ids = logits.argmax(dim=-1)
        sampled = [i for i, s in enumerate(seqs) if not s.params.greedy]
        if sampled:
            rows = _column(sampled, torch.int64, logits.device)
            picks = self._sample(logits[rows], [seqs[i] for i in sampled])
            token_ids[rows] = picks
        return self._with_logprobs(raw, token_ids, seqs)

    def _apply_penalties(self, logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        """Logit bias, then the repetition, presence and frequency penalties (vLLM's order),
        then the ban of EOS and stop ids before `min_new_tokens`; on a copy, and only for
        the rows that ask for them."""
        biased = [i for i, s in enumerate(seqs) if s.params.logit_bias]
        penalised = [i for i, s in enumerate(seqs) if s.params.repetition_penalty != 1.0]
        counted = [i for i, s in enumerate(seqs) if _counts_tokens(s.params)]
        too_short = [i for i, s in enumerate(seqs) if s.num_generated < s.params.min_new_tokens]
        if not (biased or penalised or counted or too_short):
            return logits
        logits = logits.clone()
        if biased:
            _logit_bias(logits, seqs, biased)
        if penalised:
            self._repetition_penalty(logits, [seqs[i] for i in penalised], penalised)
        if counted:
            _presence_frequency(logits, [seqs[i] for i in counted], counted)
        for i in too_short:
            banned = [*self.eos_token_ids, *seqs[i].params.stop_token_ids]
            logits[i, _column(banned, torch.int64, logits.device)] = -float("inf")
        return logits

    @staticmethod
    def _repetition_penalty(logits: torch.Tensor, seqs: list[Sequence], rows: list[int]) -> None:
        """transformers' rule: divide positive logits of seen tokens, multiply negative ones."""
        device, vocab = logits.device, logits.shape[1]
        ids = _padded([s.token_ids for s in seqs], vocab).to(device)
        idx = _column(rows, torch.int64, device)
        penalty = _column([s.params.repetition_penalty for s in seqs], torch.float32, device)
        extended = torch.cat([logits[idx], logits.new_zeros(len(seqs), 1)], dim=1)
        seen = extended.gather(1, ids)
        seen = torch.where(seen < 0, seen * penalty[:, None], seen / penalty[:, None])
        extended.scatter_(1, ids, seen)
        logits[idx] = extended[:, :vocab]

    @staticmethod
    def _sample(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
        device = logits.device
        temps = _column([s.params.temperature for s in seqs], torch.float32, device)
        logits = logits / temps[:, None]
        if any(s.params.top_k is not None for s in seqs) or any(s.params.top_p < 1 for s in seqs):
            logits = _top_k_top_p(logits, seqs)
        if any(s.params.min_p > 0 for s in seqs):
            min_p = _column([s.params.min_p for s in seqs], torch.float32, device)
            probs = logits.softmax(dim=-1)
            floor = min_p[:, None] * probs.max(dim=-1, keepdim=True).values
            logits = logits.masked_fill(probs < floor, -float("inf"))
        seed_t = _column([s.seed for s in seqs], torch.int64, device)
        counters = _column([s.num_generated for s in seqs], torch.int64, device)
        picks = []
        for lo in range(0, len(seqs), _ROW_CHUNK):
            hi = lo + _ROW_CHUNK
            noise = gumbel_noise(seed_t[lo:hi], counters[lo:hi], logits.shape[1])
            picks.append((logits[lo:hi] + noise).argmax(dim=-1))
        return torch.cat(picks)

    @staticmethod
    def _with_logprobs(raw: torch.Tensor, token_ids: torch.Tensor, seqs: list[Sequence]):
        wanted = [s.params.logprobs for s in seqs if s.params.logprobs is not None]
        if not wanted:
            return SamplerOutput(token_ids)
        logprobs = raw.log_softmax(dim=-1)
        chosen = logprobs.gather(1, token_ids[:, None]).squeeze(1)
        k = max(wanted)
        if k == 0:
            return SamplerOutput(token_ids, chosen)
        top = logprobs.topk(k, dim=-1)
        return SamplerOutput(token_ids, chosen, top.indices, top.values)


def _counts_tokens(params) -> bool:
    return params.presence_penalty != 0.0 or params.frequency_penalty != 0.0


def _padded(rows: list[list[int]], pad: int) -> torch.Tensor:
    """(len(rows), longest) int64 on the host; `pad` fills the ragged ends. Pad with the
    vocabulary size: a column index just outside the real vocabulary."""
    ids = torch.full((len(rows), max(1, max(len(r) for r in rows))), pad, dtype=torch.int64)
    for r, row in enumerate(rows):
        ids[r, : len(row)] = torch.tensor(row, dtype=torch.int64)
    return ids


def _logit_bias(logits: torch.Tensor, seqs: list[Sequence], rows: list[int]) -> None:
    """Add each request's bias to the logits of its tokens (OpenAI's `logit_bias`)."""
    device = logits.device
    pairs = [(row, t, b) for row in rows for t, b in seqs[row].params.logit_bias]
    row_idx = _column([p[0] for p in pairs], torch.int64, device)
    col_idx = _column([p[1] for p in pairs], torch.int64, device)
    bias = _column([p[2] for p in pairs], torch.float32, device)
    logits.index_put_((row_idx, col_idx), bias, accumulate=True)


def _presence_frequency(logits: torch.Tensor, seqs: list[Sequence], rows: list[int]) -> None:
    """OpenAI's penalties over the generated tokens (not the prompt): subtract
    `frequency_penalty` per occurrence and `presence_penalty` once for any."""
    device, vocab = logits.device, logits.shape[1]
    ids = _padded([s.generated_token_ids for s in seqs], vocab).to(device)  # (R, W)
    counts = torch.zeros(len(seqs), vocab + 1, device=device)
    counts.scatter_add_(1, ids, torch.ones(ids.shape, device=device))
    counts = counts[:, :vocab]  # (R, V), the padding column dropped
    freq = _column([s.params.frequency_penalty for s in seqs], torch.float32, device)
    presence = _column([s.params.presence_penalty for s in seqs], torch.float32, device)
    idx = _column(rows, torch.int64, device)
    logits[idx] -= freq[:, None] * counts + presence[:, None] * (counts > 0).float()


def _top_k_top_p(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Mask all but each row's top-k tokens and smallest nucleus of mass top-p."""
    device, vocab = logits.device, logits.shape[1]
    top_k = _column([s.params.top_k or vocab for s in seqs], torch.int64, device).clamp(max=vocab)
    top_p = _column([s.params.top_p for s in seqs], torch.float32, device)
    ordered, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(vocab, device=device)[None, :]
    drop = rank >= top_k[:, None]
    probs = ordered.masked_fill(drop, -float("inf")).softmax(dim=-1)
    # Drop a token when the mass before it already reaches top_p (the first always stays).
    drop |= (probs.cumsum(dim=-1) - probs) >= top_p[:, None]
    ordered = ordered.masked_fill(drop, -float("inf"))
    return torch.empty_like(logits).scatter_(1, order, ordered)

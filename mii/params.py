"""Generation options and prompts: MII's names and defaults, validated at the API edge.

`GenerateParams` is what users pass as keyword arguments to `pipe(...)` or
`client.generate(...)`; the engine receives the frozen `SamplingParams` that
`GenerateParams.to_sampling_params` derives from it. Every value is checked strictly (no
"10" for 10, no 1 for True), bounded so that it fits the wire (msgpack) and the engine
(int32 token ids and counts), and finite; `check_prompt` does the same for prompts.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    ValidationError,
    field_validator,
    model_validator,
)

from mii.engine.sampling_params import SamplingParams
from mii.errors import InvalidRequestError

MAX_LOGPROBS = 20
MAX_LOGIT_BIAS = 100.0  # OpenAI's bound on a logit bias
MAX_INT32 = 2**31 - 1
"""Largest token id and token count: the engine holds them as int32."""

Int = Annotated[int, Strict()]
Float = Annotated[float, Strict()]  # ints are fine, strings and bools are not
Bool = Annotated[bool, Strict()]
TokenId = Annotated[int, Strict(), Field(ge=0, le=MAX_INT32)]


class GenerateParams(BaseModel):
    """Options for text generation (DeepSpeed-MII's `GenerateParamsConfig`, plus vLLM's extras).

    Defaults follow MII: sampling is on (`do_sample=True`, `top_p=0.9`); pass
    `do_sample=False` for greedy decoding.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    max_length: Int = Field(1024, gt=0, le=MAX_INT32)
    """Maximum of prompt tokens + generated tokens."""
    max_new_tokens: Int | None = Field(None, gt=0, le=MAX_INT32)
    """Maximum number of generated tokens; `max_length` also applies."""
    min_new_tokens: Int = Field(0, ge=0, le=MAX_INT32)
    """EOS and stop tokens are suppressed until this many tokens were generated."""
    stream: Bool = False
    ignore_eos: Bool = False
    return_full_text: Bool = False
    do_sample: Bool = True
    top_p: Float = Field(0.9, gt=0, le=1)
    top_k: Int | None = Field(None, gt=0, le=MAX_INT32)
    temperature: Float | None = Field(None, ge=0)
    """0 means greedy (as in MII and OpenAI), whatever `do_sample` says."""
    stop: list[Annotated[str, Strict()]] = Field(default_factory=list)
    # Extensions beyond MII.
    min_p: Float = Field(0.0, ge=0, le=1)
    repetition_penalty: Float = Field(1.0, gt=0)
    seed: Int | None = Field(None, ge=0, lt=2**63)
    stop_token_ids: list[TokenId] = Field(default_factory=list)
    logprobs: Int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    """Return the chosen token's log-probability and this many top alternatives."""
    presence_penalty: Float = Field(0.0, ge=-2, le=2)
    """OpenAI's: subtracted once from the logit of every token generated so far."""
    frequency_penalty: Float = Field(0.0, ge=-2, le=2)
    """OpenAI's: subtracted from a token's logit once per time it was generated."""
    logit_bias: dict[str, Float] | None = None
    """OpenAI's: token id -> a value in [-100, 100] added to its logit. The ids are kept as
    text, as JSON and the wire's msgpack maps carry them."""

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _bias_ids_as_text(cls, value):
        if not isinstance(value, dict):
            return value
        ids = {str(k).strip(): v for k, v in value.items()}
        if not all(k.isdigit() for k in ids):
            raise ValueError(f"logit_bias keys are token ids (integers >= 0), got {list(value)}")
        return {str(int(k)): v for k, v in ids.items()}

    @field_validator("logit_bias")
    @classmethod
    def _bias_in_bounds(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if any(abs(bias) > MAX_LOGIT_BIAS for bias in (value or {}).values()):
            raise ValueError("logit_bias values must be in [-100, 100]")
        return value

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_list(cls, value):
        if isinstance(value, str):
            return [value]
        return value

    @field_validator("stop")
    @classmethod
    def _no_empty_stop(cls, value: list[str]) -> list[str]:
        if any(s == "" for s in value):
            raise ValueError("stop strings must not be empty")
        for text in value:
            check_text(text, "a stop string")
        return sorted(set(value))

    @model_validator(mode="after")
    def _min_below_max(self) -> GenerateParams:
        if self.max_new_tokens is not None and self.min_new_tokens > self.max_new_tokens:
            raise ValueError(
                f"min_new_tokens ({self.min_new_tokens}) exceeds "
                f"max_new_tokens ({self.max_new_tokens})"
            )
        return self

    @classmethod
    def from_kwargs(cls, **kwargs) -> GenerateParams:
        """Validate user keyword arguments; raise `InvalidRequestError` naming what is wrong."""
        unknown = sorted(set(kwargs) - set(cls.model_fields))
        if unknown:
            raise InvalidRequestError(
                f"unknown generation option(s): {', '.join(unknown)}; "
                f"known options: {', '.join(sorted(cls.model_fields))}"
            )
        try:
            return cls(**kwargs)
        except ValidationError as exc:
            raise InvalidRequestError(_describe(exc)) from None

    def max_new_tokens_for(self, prompt_length: int, max_model_len: int) -> int:
        """How many tokens a prompt of this length may generate, or an error if none."""
        limit = min(self.max_length, max_model_len)
        if prompt_length >= limit:
            raise InvalidRequestError(
                f"prompt is {prompt_length} tokens, which leaves no room to generate: "
                f"max_length is {self.max_length} and the model's context is {max_model_len} "
                "tokens"
            )
        room = limit - prompt_length
        return room if self.max_new_tokens is None else min(room, self.max_new_tokens)

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0

    def to_sampling_params(self, prompt_length: int, max_model_len: int) -> SamplingParams:
        greedy = self.greedy
        return SamplingParams(
            max_new_tokens=self.max_new_tokens_for(prompt_length, max_model_len),
            min_new_tokens=self.min_new_tokens,
            temperature=0.0 if greedy else (self.temperature or 1.0),
            top_p=1.0 if greedy else self.top_p,
            top_k=None if greedy else self.top_k,
            min_p=0.0 if greedy else self.min_p,
            repetition_penalty=self.repetition_penalty,
            seed=self.seed,
            ignore_eos=self.ignore_eos,
            stop=tuple(self.stop),
            stop_token_ids=tuple(self.stop_token_ids),
            logprobs=self.logprobs,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            logit_bias=tuple(sorted((int(k), v) for k, v in (self.logit_bias or {}).items())),
        )


def _describe(exc: ValidationError) -> str:
    return "invalid generation options: " + describe_errors(exc)


def describe_errors(exc: ValidationError) -> str:
    """pydantic's errors in one line: `field: what is wrong (got value)`."""
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "options"
        msg = err["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {msg} (got {_short(err.get('input'))})")
    return "; ".join(parts)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def check_text(text: str, what: str) -> None:
    """Refuse text that is not valid Unicode (a lone surrogate, such as "\\udcff" from
    undecodable bytes): it cannot be sent as UTF-8."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = text[exc.start : exc.end]
        raise InvalidRequestError(
            f"{what} is not valid Unicode text: it holds the lone surrogate {bad!r} at "
            f"character {exc.start} (decode bytes with a real encoding first)"
        ) from None


def as_prompt_list(prompts: Any) -> list[str | list[int]]:
    """One prompt (text or token ids) or a list of them, each checked (`check_prompt`)."""
    if isinstance(prompts, str) or _looks_like_ids(prompts):
        return [check_prompt(prompts)]
    if not isinstance(prompts, list | tuple):
        check_prompt(prompts)  # raises: says what a prompt must be
    if not prompts:
        raise InvalidRequestError("no prompts given (an empty list)")
    return [check_prompt(p, i if len(prompts) > 1 else None) for i, p in enumerate(prompts)]


def _looks_like_ids(value: Any) -> bool:
    return isinstance(value, list | tuple) and bool(value) and isinstance(value[0], int)


def check_prompt(prompt: Any, index: int | None = None) -> str | list[int]:
    """A prompt as the engine takes it: non-empty valid text, or a non-empty list of token
    ids (ints from 0 to 2**31-1); anything else is an `InvalidRequestError` saying so.
    `index`: where the prompt is in the caller's list, for the message."""
    at = "" if index is None else f" (prompts[{index}])"
    if isinstance(prompt, str) and prompt:
        check_text(prompt, f"prompt{at}")
        return prompt
    if isinstance(prompt, list | tuple) and prompt:
        for i, token in enumerate(prompt):
            if type(token) is not int or not 0 <= token <= MAX_INT32:
                raise InvalidRequestError(
                    f"prompt{at}: token id {_short(token)} at position {i} is not an int "
                    f"from 0 to {MAX_INT32}"
                )
        return list(prompt)
    if prompt == "" or (isinstance(prompt, list | tuple) and not prompt):
        raise InvalidRequestError(f"prompt is empty{at}: {_PROMPT_IS}")
    hint = "; decode bytes to str first" if isinstance(prompt, bytes | bytearray) else ""
    raise InvalidRequestError(
        f"{_PROMPT_IS}, not {type(prompt).__name__} {_short(prompt)}{at}{hint}"
    )


_PROMPT_IS = "a prompt is a string or a list of token ids, and non-empty"


def encode_prompt(tokenizer, prompt: str | list[int]) -> list[int]:
    """Token ids of a prompt given as text or as ids; a clear error for a bad one."""
    prompt = check_prompt(prompt)
    if isinstance(prompt, list):
        return prompt
    if tokenizer is None:
        raise InvalidRequestError(
            "this model runs without a tokenizer (skip_tokenizer_init): send token ids"
        )
    return tokenizer.encode(prompt)

"""Generation options: MII's names and defaults, validated with pydantic at the API edge.

`GenerateParams` is what users pass as keyword arguments to `pipe(...)` or
`client.generate(...)`; the engine receives the frozen `SamplingParams` that
`GenerateParams.to_sampling_params` derives from it.
"""

from __future__ import annotations

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from mii.engine.sampling_params import SamplingParams
from mii.errors import InvalidRequestError

MAX_LOGPROBS = 20
MAX_LOGIT_BIAS = 100.0  # OpenAI's bound on a logit bias


class GenerateParams(BaseModel):
    """Options for text generation (DeepSpeed-MII's `GenerateParamsConfig`, plus vLLM's extras).

    Defaults follow MII: sampling is on (`do_sample=True`, `top_p=0.9`); pass
    `do_sample=False` for greedy decoding.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_length: int = Field(1024, gt=0)
    """Maximum of prompt tokens + generated tokens."""
    max_new_tokens: int | None = Field(None, gt=0)
    """Maximum number of generated tokens; `max_length` also applies."""
    min_new_tokens: int = Field(0, ge=0)
    """EOS and stop tokens are suppressed until this many tokens were generated."""
    stream: bool = False
    ignore_eos: bool = False
    return_full_text: bool = False
    do_sample: bool = True
    top_p: float = Field(0.9, gt=0, le=1)
    top_k: int | None = Field(None, gt=0)
    temperature: float | None = Field(None, gt=0)
    stop: list[str] = Field(default_factory=list)
    # Extensions beyond MII.
    min_p: float = Field(0.0, ge=0, le=1)
    repetition_penalty: float = Field(1.0, gt=0)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop_token_ids: list[int] = Field(default_factory=list)
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    """Return the chosen token's log-probability and this many top alternatives."""
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    """OpenAI's: subtracted once from the logit of every token generated so far."""
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    """OpenAI's: subtracted from a token's logit once per time it was generated."""
    logit_bias: dict[str, float] | None = None
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

    def to_sampling_params(self, prompt_length: int, max_model_len: int) -> SamplingParams:
        greedy = not self.do_sample
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
    parts = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or "options"
        parts.append(f"{where}: {err['msg']} (got {err.get('input')!r})")
    return "invalid generation options: " + "; ".join(parts)


def encode_prompt(tokenizer, prompt: str | list[int]) -> list[int]:
    """Token ids of a prompt given as text or as ids; a clear error for an empty one."""
    if isinstance(prompt, str):
        if not prompt:
            raise InvalidRequestError("prompt is empty")
        if tokenizer is None:
            raise InvalidRequestError(
                "this model runs without a tokenizer (skip_tokenizer_init): send token ids"
            )
        return tokenizer.encode(prompt)
    if isinstance(prompt, list | tuple) and all(
        isinstance(t, int) and not isinstance(t, bool) for t in prompt
    ):
        if not prompt:
            raise InvalidRequestError("prompt is empty")
        return list(prompt)
    raise InvalidRequestError(
        f"a prompt is a string or a list of token ids, not {type(prompt).__name__}"
    )

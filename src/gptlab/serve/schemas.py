"""What goes over the wire: the server's limits, the completion request (OpenAI's shape) and
the JSON objects answered, whole or as server-sent-event chunks."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from gptlab.config import SampleConfig

# Request field -> SampleConfig field, for the ones whose names differ.
SAMPLE_FIELD_NAMES = {"max_tokens": "max_new_tokens", "n": "num_samples"}
MAX_PROMPTS = 1024  # the most prompts one request's list may hold, whatever --max_choices says


class ApiError(Exception):
    """An HTTP error answered as OpenAI's error object; the message names the problem and the fix."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        close: bool = False,
    ):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code
        self.close = close  # close the connection after answering: the request's body was not read


class ServeLimits(BaseModel):
    """What one request may ask of the server; beyond it the answer is a 4xx with the reason."""

    model_config = ConfigDict(extra="forbid")

    max_prompt_tokens: int | None = Field(
        None, gt=0, description="Longest prompt in tokens (default: the model's context, seq_len)."
    )
    max_tokens_limit: int = Field(1024, gt=0, description="Largest max_tokens a request may ask for.")
    max_concurrent: int = Field(4, gt=0, description="Requests queued or generating at once; more get 429.")
    max_choices: int = Field(8, gt=0, description="Largest n times the number of prompts in one request.")
    max_body_bytes: int = Field(
        2**20, gt=0, description="Largest request body in bytes; a larger one gets 413 before it is read."
    )
    body_timeout: float = Field(
        30.0, gt=0, description="Seconds a request body may take to arrive; a slower one gets 408."
    )


LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


class ServeAccess(BaseModel):
    """Who may use the server: the API key requests must carry (none: anyone who can connect)
    and the Host names it answers to beyond the loopback ones ("*": any)."""

    model_config = ConfigDict(extra="forbid")

    api_key: str | None = Field(None, min_length=1, description="Key sent as Authorization: Bearer KEY.")
    allowed_hosts: tuple[str, ...] = Field(
        (), description="Host names or addresses requests may name besides localhost, 127.0.0.1 and ::1."
    )

    @field_validator("allowed_hosts")
    @classmethod
    def _lower_case(cls, hosts: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(host.strip().lower().rstrip(".") for host in hosts if host.strip())

    def allows_host(self, host: str) -> bool:
        """Whether a request's Host header value is allowed."""
        return "*" in self.allowed_hosts or host_name(host) in (*LOOPBACK_NAMES, *self.allowed_hosts)


def host_name(host: str) -> str:
    """The name or address of a Host header value, without its port. Example: "[::1]:8000" -> "::1"."""
    host = host.strip().lower()
    if host.startswith("["):  # [IPv6 address]:port
        host = host[1 : host.find("]")]
    elif host.count(":") == 1:  # name:port (a bare IPv6 address has several colons)
        host = host.partition(":")[0]
    return host.rstrip(".")


class StrictObject(BaseModel):
    """A request object that refuses unknown fields, naming the first one only."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _one_unknown_field(cls, data: Any) -> Any:
        # Pydantic reports every unknown field, and a 1 MiB body holds 100,000 of them: seconds
        # and hundreds of MB of error objects. One is enough to say what is wrong.
        if isinstance(data, dict) and len(data) > len(cls.model_fields):
            first = next((name for name in data if name not in cls.model_fields), None)
            data = {name: value for name, value in data.items() if name in cls.model_fields or name == first}
        return data


class StreamOptions(StrictObject):
    include_usage: bool = False


class CompletionRequest(StrictObject):
    """The body of POST /v1/completions: OpenAI's fields, plus top_k, min_p and
    repetition_penalty. Values are checked by building a SampleConfig (sample_config)."""

    model: str | None = None  # echoed as the served model's name: there is only one
    # At most MAX_PROMPTS, checked before the items: pydantic reports each bad item, and a 1 MiB
    # body holds half a million of them. --max_choices sets the limit a server answers with.
    prompt: str | Annotated[list[str], Field(max_length=MAX_PROMPTS)] = ""
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None  # OpenAI's limit: each is checked per token
    n: int = 1
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted for compatibility, unused
    # OpenAI fields gptlab does not implement. Clients often send them at their "off" values,
    # which are accepted; anything else is refused by name (UNSUPPORTED_OFF_VALUES).
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logprobs: int | None = None
    echo: bool = False
    best_of: int | None = None
    logit_bias: dict[str, Any] | None = None  # values unchecked: only an empty one is accepted
    suffix: str | None = None

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def sample_config(self) -> SampleConfig:
        """The SampleConfig this request asks for; ApiError 400 naming the request's field."""
        refuse_unsupported(self, UNSUPPORTED_OFF_VALUES)
        if self.best_of not in (None, self.n):
            raise ApiError(
                400, "best_of is not supported by this server (leave it out, or equal to n)", param="best_of"
            )
        values: dict[str, Any] = {
            "max_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p,
            "top_k": self.top_k, "min_p": self.min_p, "repetition_penalty": self.repetition_penalty,
            "stop": self.stop or [], "n": self.n, "seed": self.seed,
        }  # fmt: skip
        return to_sample_config(values)


def refuse_unsupported(request: BaseModel, off_values: dict[str, tuple[Any, ...]]) -> None:
    """ApiError 400 naming the first field gptlab does not implement that is sent at another
    value than one of its "off" values."""
    for name, accepted in off_values.items():
        if getattr(request, name) not in accepted:
            hint = "; use repetition_penalty" if name.endswith("_penalty") else ""
            raise ApiError(400, f"{name} is not supported by this server (leave it out){hint}", param=name)


def to_sample_config(values: dict[str, Any]) -> SampleConfig:
    """A SampleConfig from a request's values, named as in the request (max_tokens, n);
    ApiError 400 naming the request's field when one is out of range."""
    try:
        return SampleConfig(**{SAMPLE_FIELD_NAMES.get(name, name): value for name, value in values.items()})
    except ValidationError as err:
        first = err.errors()[0]
        sample_name = str(first["loc"][0]) if first["loc"] else ""
        request_name = {v: k for k, v in SAMPLE_FIELD_NAMES.items()}.get(sample_name, sample_name)
        message = first["msg"].removeprefix("Value error, ")
        raise ApiError(400, f"invalid value: {request_name}: {message}", param=request_name) from None


UNSUPPORTED_OFF_VALUES: dict[str, tuple[Any, ...]] = {
    "frequency_penalty": (0, 0.0), "presence_penalty": (0, 0.0), "logprobs": (None,), "echo": (False,),
    "logit_bias": (None, {}), "suffix": (None, ""),
}  # fmt: skip
UNSUPPORTED_FIELDS = (*UNSUPPORTED_OFF_VALUES, "best_of")


@dataclass
class CompletionMeta:
    """What every object of one response repeats."""

    model: str
    id: str = field(default_factory=lambda: f"cmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))

    def envelope(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
            "choices": choices,
        }  # fmt: skip


def choice(index: int, text: str, finish_reason: str | None) -> dict[str, Any]:
    return {"text": text, "index": index, "logprobs": None, "finish_reason": finish_reason}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def error_kind(status: int) -> str:
    """OpenAI's error type for an HTTP status: the client's fault below 500, the server's from it."""
    return "invalid_request_error" if status < 500 else "server_error"


def error_body(message: str, kind: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    """OpenAI's error object: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def sse_event(payload: dict[str, Any] | str) -> str:
    """One server-sent event: `data: <json>` and a blank line."""
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"

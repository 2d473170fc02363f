"""The chat completions request and response (OpenAI's shape): a conversation in, the
assistant's next message out, as one `chat.completion` object or as `chat.completion.chunk`
server-sent events whose choices carry a `delta`."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Annotated, Any

from pydantic import Field, field_validator

from gptlab.config import SampleConfig
from gptlab.serve.schemas import ApiError, StreamOptions, StrictObject, refuse_unsupported, to_sample_config
from gptlab.tokenizers.chat import CHAT_ROLES

MAX_MESSAGES = 1024  # the most messages one request may hold, whatever the prompt limit says
ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name for the system message


class ChatMessage(StrictObject):
    """One message of the conversation. Content is a string, or OpenAI's list of text parts
    ([{"type": "text", "text": "..."}]), which are joined."""

    role: str
    content: str

    @field_validator("content", mode="before")
    @classmethod
    def _join_text_parts(cls, content: Any) -> Any:
        if not isinstance(content, list):
            return content
        texts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise ValueError('only text is supported: a string, or parts like {"type": "text", "text": "..."}')
            texts.append(part["text"])
        return "".join(texts)


class ChatCompletionRequest(StrictObject):
    """The body of POST /v1/chat/completions: OpenAI's fields, plus top_k, min_p and
    repetition_penalty. Values are checked by building a SampleConfig (sample_config)."""

    model: str | None = None  # echoed as the served model's name: there is only one
    # At most MAX_MESSAGES, checked before the items (as CompletionRequest.prompt).
    messages: Annotated[list[ChatMessage], Field(max_length=MAX_MESSAGES)]
    max_tokens: int | None = None  # default: the model's context, at most --max_tokens_limit
    max_completion_tokens: int | None = None  # OpenAI's newer name for max_tokens
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float = 1.0
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    n: int = 1
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted for compatibility, unused
    # OpenAI fields gptlab does not implement, accepted at their "off" values only.
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logprobs: bool | None = None
    top_logprobs: int | None = None
    logit_bias: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None

    def conversation(self) -> list[dict[str, str]]:
        """The messages as the chat template reads them; ApiError 400 for an empty list or an
        unknown role."""
        if not self.messages:
            raise ApiError(400, "messages is an empty list; send at least one message", param="messages")
        conversation = []
        for i, message in enumerate(self.messages):
            role = ROLE_ALIASES.get(message.role, message.role)
            if role not in CHAT_ROLES:
                raise ApiError(
                    400,
                    f"messages[{i}].role is {message.role!r}; this server takes {', '.join(CHAT_ROLES)}",
                    param=f"messages[{i}].role",
                )
            conversation.append({"role": role, "content": message.content})
        return conversation

    def sample_config(self, default_max_tokens: int) -> SampleConfig:
        """The SampleConfig this request asks for; ApiError 400 naming the request's field."""
        refuse_unsupported(self, CHAT_UNSUPPORTED_OFF_VALUES)
        max_tokens = self.max_tokens
        if self.max_completion_tokens is not None:
            if max_tokens not in (None, self.max_completion_tokens):
                raise ApiError(
                    400, "max_tokens and max_completion_tokens differ; send only one", param="max_completion_tokens"
                )
            max_tokens = self.max_completion_tokens
        values: dict[str, Any] = {
            "max_tokens": default_max_tokens if max_tokens is None else max_tokens, "temperature": self.temperature,
            "top_p": self.top_p, "top_k": self.top_k, "min_p": self.min_p,
            "repetition_penalty": self.repetition_penalty, "stop": self.stop or [], "n": self.n, "seed": self.seed,
        }  # fmt: skip
        return to_sample_config(values)


CHAT_UNSUPPORTED_OFF_VALUES: dict[str, tuple[Any, ...]] = {
    "frequency_penalty": (0, 0.0), "presence_penalty": (0, 0.0), "logprobs": (None, False), "top_logprobs": (None,),
    "logit_bias": (None, {}), "tools": (None, []), "tool_choice": (None, "none"),
    "response_format": (None, {"type": "text"}),
}  # fmt: skip


@dataclass
class ChatMeta:
    """What every object of one chat response repeats."""

    model: str
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))

    def whole(self, choices: list[dict[str, Any]], usage: dict[str, int]) -> dict[str, Any]:
        return {
            "id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
            "choices": choices, "usage": usage, "system_fingerprint": None,
        }  # fmt: skip

    def chunk(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {
            "id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
            "choices": choices, "system_fingerprint": None, **extra,
        }  # fmt: skip


def message_choice(index: int, text: str, finish_reason: str) -> dict[str, Any]:
    return {
        "index": index, "message": {"role": "assistant", "content": text}, "logprobs": None,
        "finish_reason": finish_reason,
    }  # fmt: skip


def delta_choice(index: int, delta: dict[str, str], finish_reason: str | None = None) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}

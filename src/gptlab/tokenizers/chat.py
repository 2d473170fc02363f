"""The chat template: how a conversation becomes token ids, for every tokenizer kind.

A conversation is a list of messages `{"role": "system" | "user" | "assistant", "content": str}`
(OpenAI's shape). Each message is its role marker, its content, then the end-of-turn marker:

    <|system|>You are terse.<|end|><|user|>2+2?<|end|><|assistant|>4<|end|>

The four markers are special tokens added to the tokenizer (`with_chat_tokens`), so they take
new ids after the tokenizer's own and travel with its files (and so with every checkpoint).
Content is encoded as plain text: a marker string typed by a user stays text, never a marker.
A prompt for generation ends with `<|assistant|>` (add_generation_prompt); the model's answer
ends where it emits `<|end|>` (end_of_turn_id).

For supervised fine-tuning the loss learns only what the assistant says: its content and the
`<|end|>` that closes it (so the model learns to stop), never the role markers, the system
prompt or the user's turns (encode_chat_for_training). An assistant message with `"weight": 0`
(OpenAI's fine-tuning field) is context only and is not learnt either.
"""

from __future__ import annotations

from collections.abc import Sequence

from gptlab.errors import GptlabError
from gptlab.tokenizers.base import Tokenizer

CHAT_ROLES = ("system", "user", "assistant")
ROLE_MARKERS = {role: f"<|{role}|>" for role in CHAT_ROLES}
END_OF_TURN = "<|end|>"
CHAT_TOKENS: tuple[str, ...] = (*ROLE_MARKERS.values(), END_OF_TURN)

# The same template in Jinja, as Hugging Face's `apply_chat_template` renders it; the rendered
# text is then tokenized with the markers as special tokens, which gives encode_chat's ids.
CHAT_TEMPLATE_JINJA = (
    "{%- for message in messages -%}"
    "{%- if message['role'] not in ['system', 'user', 'assistant'] -%}"
    "{{ raise_exception('unknown role ' + message['role'] + '; use system, user or assistant') }}"
    "{%- endif -%}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '" + END_OF_TURN + "' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '" + ROLE_MARKERS["assistant"] + "' }}{%- endif -%}"
)


def with_chat_tokens(tokenizer: Tokenizer) -> Tokenizer:
    """`tokenizer` with the chat markers as special tokens (new ids after its last one; every
    existing id unchanged). Returns `tokenizer` itself when it already has them."""
    return tokenizer.with_special_tokens(CHAT_TOKENS)


def has_chat_template(tokenizer: Tokenizer) -> bool:
    """Whether `tokenizer` has every chat marker as a special token."""
    specials = tokenizer.special_tokens
    return all(token in specials for token in CHAT_TOKENS)


def end_of_turn_id(tokenizer: Tokenizer) -> int:
    """The id of `<|end|>`, where generation of an assistant turn stops."""
    return _marker_ids(tokenizer)[END_OF_TURN]


def encode_chat(tokenizer: Tokenizer, messages: Sequence[dict], add_generation_prompt: bool) -> list[int]:
    """The ids of `messages`; with `add_generation_prompt`, followed by `<|assistant|>` so that
    the model's next tokens are the assistant's answer."""
    ids, _ = _encode(tokenizer, messages, add_generation_prompt)
    return ids


def encode_chat_for_training(tokenizer: Tokenizer, messages: Sequence[dict]) -> tuple[list[int], list[bool]]:
    """The ids of `messages` and, per id, whether the loss learns it: True for the content of
    each assistant message (unless its "weight" is 0) and the `<|end|>` that closes it."""
    return _encode(tokenizer, messages, add_generation_prompt=False)


def _encode(
    tokenizer: Tokenizer, messages: Sequence[dict], add_generation_prompt: bool
) -> tuple[list[int], list[bool]]:
    markers = _marker_ids(tokenizer)
    if not isinstance(messages, (list, tuple)):
        raise GptlabError(f"messages must be a list of {{'role', 'content'}} objects, not {type(messages).__name__}")
    ids: list[int] = []
    learn: list[bool] = []
    for number, message in enumerate(messages, start=1):
        role, content = check_message(message, number)
        content_ids = tokenizer.encode(content)  # no special allowed: marker strings stay text
        learnt = role == "assistant" and message.get("weight", 1) != 0
        ids += [markers[ROLE_MARKERS[role]], *content_ids, markers[END_OF_TURN]]
        learn += [False] + [learnt] * (len(content_ids) + 1)
    if add_generation_prompt:
        ids.append(markers[ROLE_MARKERS["assistant"]])
        learn.append(False)
    return ids, learn


def check_message(message: object, number: int) -> tuple[str, str]:
    """(role, content) of the `number`th message, or GptlabError saying what is wrong with it."""
    if not isinstance(message, dict):
        raise GptlabError(f"message {number} is not an object with 'role' and 'content'")
    role, content = message.get("role"), message.get("content")
    if role not in CHAT_ROLES:
        shown = "missing" if role is None else repr(role)
        raise GptlabError(f"message {number} has role {shown}; use one of {', '.join(CHAT_ROLES)}")
    if not isinstance(content, str):
        shown = "missing" if content is None else f"a {type(content).__name__}"
        raise GptlabError(f"message {number} ({role}) has content {shown}; it must be a string")
    weight = message.get("weight", 1)
    if weight not in (0, 1) or isinstance(weight, bool):
        raise GptlabError(f"message {number} ({role}) has weight {weight!r}; it must be 0 or 1")
    return role, content


def _marker_ids(tokenizer: Tokenizer) -> dict[str, int]:
    if not has_chat_template(tokenizer):
        raise GptlabError(
            "this tokenizer has no chat template (no <|user|> <|assistant|> markers); fine-tune the model "
            "with `gptlab train --task chat` first"
        )
    specials = tokenizer.special_tokens
    return {token: specials[token] for token in CHAT_TOKENS}

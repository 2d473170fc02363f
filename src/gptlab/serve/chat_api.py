"""POST /v1/chat/completions, the parts apart from the route (app.py): the conversation as the
prompt's token ids (the checkpoint's chat template), and the answer as OpenAI's chat objects,
whole or streamed."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence

from gptlab.errors import GptlabError
from gptlab.generation import Piece, SampleEnd
from gptlab.serve.chat_schemas import ChatMeta, delta_choice, message_choice
from gptlab.serve.runner import Failed, Job
from gptlab.serve.schemas import ApiError, error_body, error_kind, sse_event, usage
from gptlab.tokenizers.base import Tokenizer
from gptlab.tokenizers.chat import encode_chat

log = logging.getLogger("gptlab.serve")
NO_TEMPLATE = (
    "this model has no chat template (its tokenizer has no <|user|> <|assistant|> markers), so it cannot "
    "chat; fine-tune it with `gptlab train --task chat`, or send a prompt to /v1/completions"
)


def encode_conversation(
    tokenizer: Tokenizer, messages: Sequence[dict[str, str]], max_prompt_tokens: int, seq_len: int
) -> list[int]:
    """The conversation's ids, ending with the assistant's marker; ApiError 400 for one over the limit.

    A conversation longer than the context keeps its tail (only when --max_prompt_tokens allows it).
    """
    try:
        ids = encode_chat(tokenizer, messages, add_generation_prompt=True)
    except GptlabError as err:
        raise ApiError(400, str(err), param="messages") from None
    if len(ids) > max_prompt_tokens:
        raise ApiError(
            400,
            f"the conversation is {len(ids)} tokens, over this server's limit of {max_prompt_tokens} "
            "(--max_prompt_tokens); send fewer or shorter messages",
            param="messages",
            code="context_length_exceeded",
        )
    if len(ids) > seq_len:
        log.info("conversation of %d tokens: keeping its last %d (the model's context)", len(ids), seq_len)
    return ids[-seq_len:]


async def chat_stream_events(
    job: Job, meta: ChatMeta, n_choices: int, prompt_tokens: int, include_usage: bool
) -> AsyncIterator[str]:
    """The answer as `chat.completion.chunk` events: each choice's role first, a chunk per text
    piece, one with each choice's finish_reason, the usage if asked for, then `data: [DONE]`."""
    extra = {"usage": None} if include_usage else {}  # as OpenAI: present on every chunk, set on the last
    for index in range(n_choices):
        yield sse_event(meta.chunk([delta_choice(index, {"role": "assistant", "content": ""})], **extra))
    completion_tokens = 0
    async for event in job.events():
        if isinstance(event, Piece):
            yield sse_event(meta.chunk([delta_choice(event.index, {"content": event.text})], **extra))
        elif isinstance(event, SampleEnd):
            completion_tokens += event.completion_tokens
            yield sse_event(meta.chunk([delta_choice(event.index, {}, event.finish_reason)], **extra))
        elif isinstance(event, Failed):
            yield sse_event(error_body(event.message, error_kind(event.status)))
    if include_usage:
        yield sse_event(meta.chunk([], usage=usage(prompt_tokens, completion_tokens)))
    yield sse_event("[DONE]")


async def gather_choices(job: Job, n_choices: int) -> tuple[list[str], dict[int, SampleEnd]]:
    """Each choice's whole text and how it ended, once every choice has ended (the whole,
    unstreamed answer of both endpoints); ApiError when the job failed or was cancelled."""
    texts = [""] * n_choices
    ends: dict[int, SampleEnd] = {}
    async for event in job.events():
        if isinstance(event, Piece):
            texts[event.index] += event.text
        elif isinstance(event, SampleEnd):
            ends[event.index] = event
        elif isinstance(event, Failed):
            raise ApiError(event.status, event.message, error_kind(event.status))
    if len(ends) < n_choices:  # cancelled: the client hung up, and nobody reads this
        raise ApiError(499, "the client closed the connection before the answer was complete")
    return texts, ends


async def chat_whole_response(job: Job, meta: ChatMeta, n_choices: int, prompt_tokens: int) -> dict:
    """The answer as one `chat.completion` object, once every choice has ended."""
    texts, ends = await gather_choices(job, n_choices)
    choices = [message_choice(i, texts[i], ends[i].finish_reason) for i in range(n_choices)]
    completion_tokens = sum(end.completion_tokens for end in ends.values())
    return meta.whole(choices, usage(prompt_tokens, completion_tokens))

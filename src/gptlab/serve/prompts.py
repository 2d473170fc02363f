"""A request's prompts as token ids, within the server's limit on prompt length.

A prompt too long for the limit is refused twice over: cheaply from its size in bytes, before
any encoding (a tokenizer cannot read many bytes into few ids), then exactly from its ids.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from gptlab.errors import GptlabError
from gptlab.serve.schemas import ApiError
from gptlab.tokenizers.base import Tokenizer
from gptlab.tokenizers.byte_level import utf8_bytes

log = logging.getLogger("gptlab.serve")
BYTE_LEVEL_KINDS = ("default", "tiktoken")  # byte-level BPE: every id stands for a fixed run of bytes


def max_bytes_per_token(tokenizer: Tokenizer) -> int | None:
    """The most bytes of UTF-8 text one id can stand for, or None where the kind sets no bound
    (sentencepiece: its normalization may shrink text, and unknown characters may share one id).

    Example: a BPE tokenizer whose longest token is b" the" -> 4.
    """
    if tokenizer.kind == "char":
        return 4  # one character per id (<UNK> for one outside the vocabulary), at most 4 bytes
    if tokenizer.kind not in BYTE_LEVEL_KINDS:
        return None
    longest = 0
    for i in range(tokenizer.vocab_size):
        try:
            # A lone byte of a split character decodes to U+FFFD (3 bytes): never under its own count.
            longest = max(longest, len(utf8_bytes(tokenizer.decode([i]))))
        except GptlabError:  # an id the encoding leaves unused
            continue
    return longest


def check_prompt_bytes(
    prompts: Sequence[str], max_prompt_tokens: int, bytes_per_token: int | None, param: str = "prompt"
) -> None:
    """ApiError 400 for a prompt with more bytes than `max_prompt_tokens` ids could ever stand for
    (`param`: the request's field the prompts come from)."""
    if bytes_per_token is None:
        return
    limit = max_prompt_tokens * bytes_per_token
    for i, prompt in enumerate(prompts):
        # Each character takes 1 to 4 bytes: most prompts are decided without encoding them.
        if len(prompt) * 4 > limit and (size := len(utf8_bytes(prompt))) > limit:
            raise ApiError(
                400,
                f"{prompt_name(i, len(prompts), param)} is {size:,} bytes, more than {max_prompt_tokens} tokens can "
                f"hold (this tokenizer's longest token is {bytes_per_token} bytes; --max_prompt_tokens); shorten it",
                param=param,
            )


def encode_prompts(
    tokenizer: Tokenizer, prompts: Sequence[str], max_prompt_tokens: int, seq_len: int
) -> list[list[int]]:
    """Token ids of each prompt as the model reads them; ApiError 400 for one over the limit.

    As in `gptlab generate`, an empty prompt starts a new document (<EOS>) and a prompt
    longer than the context keeps its tail (only when --max_prompt_tokens allows it).
    """
    encoded = []
    for i, prompt in enumerate(prompts):
        ids = tokenizer.encode(prompt)
        if len(ids) > max_prompt_tokens:
            raise ApiError(
                400,
                f"{prompt_name(i, len(prompts))} is {len(ids)} tokens, over this server's limit of "
                f"{max_prompt_tokens} (--max_prompt_tokens); shorten it",
                param="prompt",
            )
        if len(ids) > seq_len:
            log.info("prompt of %d tokens: keeping its last %d (the model's context)", len(ids), seq_len)
        encoded.append(ids[-seq_len:] or [tokenizer.eos_id])
    return encoded


def prompt_name(index: int, count: int, param: str = "prompt") -> str:
    if param == "messages":
        return "the messages' content"
    return "prompt" if count == 1 else f"prompt {index}"

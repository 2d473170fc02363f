"""Where a chat fine-tuning run (`--task chat`) starts: the tokenizer gains the chat markers
and the starting weights rows for them (`--init_from` is read by interop/base_models.py).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from gptlab.config import ModelConfig
from gptlab.errors import GptlabError
from gptlab.models.vocab import with_new_token_rows
from gptlab.tokenizers.base import Tokenizer
from gptlab.tokenizers.chat import with_chat_tokens


def chat_start(
    model_cfg: ModelConfig, tokenizer: Tokenizer, init_weights: Mapping[str, torch.Tensor] | None, lora: bool = False
) -> tuple[ModelConfig, Tokenizer, Mapping[str, torch.Tensor] | None]:
    """The config, tokenizer and starting weights of a chat run: the tokenizer with the chat
    markers (unchanged when it has them), and given weights with the markers' new rows set to
    the mean of the trained ones (models/vocab.py). A fresh model needs no rows: it is built
    for the grown tokenizer."""
    if model_cfg.model != "gpt":
        raise GptlabError("--task chat fine-tunes a GPT on conversations; drop --model transformer")
    chat_tokenizer = with_chat_tokens(tokenizer)
    if init_weights is None or chat_tokenizer is tokenizer:
        return model_cfg, chat_tokenizer, init_weights
    if lora:  # the markers' new rows would be frozen, and the base's fingerprint would not be the base's
        raise GptlabError(
            "--lora_rank with --task chat needs a base that already has the chat markers; fine-tune it with "
            "--task chat without --lora_rank first"
        )
    new_ids = range(tokenizer.vocab_size, chat_tokenizer.vocab_size)  # the markers take the next ids
    model_cfg, state = with_new_token_rows(init_weights, model_cfg, new_ids, trained_rows=tokenizer.vocab_size)
    return model_cfg, chat_tokenizer, state

"""Where a chat fine-tuning run (`--task chat`) starts: the tokenizer gains the chat markers
and the starting weights rows for them; and `--init_from` a gptlab checkpoint.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from gptlab.config import ModelConfig
from gptlab.errors import GptlabError
from gptlab.models.vocab import with_new_token_rows
from gptlab.tokenizers.base import Tokenizer
from gptlab.tokenizers.chat import with_chat_tokens
from gptlab.training.checkpoint import load_checkpoint

# Model fields a fine-tuning run may change; every other shape comes from the starting model.
FINE_TUNABLE = {"dropout", "seq_len"}


def chat_start(
    model_cfg: ModelConfig, tokenizer: Tokenizer, init_weights: Mapping[str, torch.Tensor] | None
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
    new_ids = range(tokenizer.vocab_size, chat_tokenizer.vocab_size)  # the markers take the next ids
    model_cfg, state = with_new_token_rows(init_weights, model_cfg, new_ids, trained_rows=tokenizer.vocab_size)
    return model_cfg, chat_tokenizer, state


def checkpoint_start(
    path: str | Path, model_values: dict[str, Any]
) -> tuple[ModelConfig, Tokenizer, dict[str, torch.Tensor]]:
    """The model config, tokenizer and weights of a gptlab GPT checkpoint, to fine-tune from.

    `model_values` are the model fields the user set: `dropout` and a `seq_len` up to the
    checkpoint's may change; any other field must agree with it, else GptlabError naming it.
    Only the weights are taken: the optimizer, schedule and data position start afresh.
    """
    checkpoint = load_checkpoint(path)
    config = checkpoint.model_config
    if config.model != "gpt":
        raise GptlabError(f"{path} holds an encoder-decoder Transformer; --init_from takes a GPT checkpoint")
    for name, value in model_values.items():
        if name not in FINE_TUNABLE and getattr(config, name) != value:
            raise GptlabError(
                f"--{name} {value} contradicts the checkpoint {path} ({name} = {getattr(config, name)}); "
                f"drop the flag (only {', '.join(sorted(FINE_TUNABLE))} may change)"
            )
    seq_len = int(model_values.get("seq_len", config.seq_len))
    if seq_len > config.seq_len:
        raise GptlabError(f"--seq_len {seq_len} exceeds the checkpoint's context ({config.seq_len}); lower it")
    state = dict(checkpoint.model_state)
    if "wpe.weight" in state:  # learned positions beyond seq_len are never used
        state["wpe.weight"] = state["wpe.weight"][:seq_len]
    updates = {name: model_values[name] for name in FINE_TUNABLE if name in model_values}
    return config.model_copy(update=updates), checkpoint.tokenizer, state

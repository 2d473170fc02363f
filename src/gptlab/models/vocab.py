"""Rows for tokens added to a trained model's vocabulary (the chat markers, for instance).

A new token has no trained embedding. Starting it as the mean of the trained rows makes it an
unremarkable token, neither a copy of one it must be told apart from nor a random vector whose
logit could be huge: the model's outputs on text without it are unchanged, and fine-tuning
moves it from there.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from gptlab.config import ModelConfig
from gptlab.errors import GptlabError

# The GPT's tables indexed by token id: the input embedding and the output head (one matrix when
# tied), and any value-embedding tables (value_embeds.<j>.weight).
TOKEN_TABLES = ("wte.weight", "lm_head.weight")
VALUE_TABLES = "value_embeds."


def with_new_token_rows(
    state: Mapping[str, torch.Tensor], config: ModelConfig, new_ids: Sequence[int], trained_rows: int
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """A GPT's config and weights with the rows of `new_ids` set to the mean of its first
    `trained_rows` rows (the ids its tokenizer had), in every table indexed by token id.
    The tables grow when an id lies past their end (config.tgt_vocab_size grows with them);
    an id already inside them (a table rounded up) reuses that spare row. Tied tables stay one
    tensor. Every other row and weight is unchanged."""
    new_ids = sorted(set(int(i) for i in new_ids))
    if not new_ids:
        return config, dict(state)
    rows = config.tgt_vocab_size
    if rows is None or "wte.weight" not in state:
        raise GptlabError("adding token rows needs a GPT's weights and its tgt_vocab_size")
    if new_ids[0] < trained_rows or trained_rows <= 0:
        raise GptlabError(f"new token ids must come after the {trained_rows} trained ones, got {new_ids[0]}")
    grown = max(rows, new_ids[-1] + 1)
    out = dict(state)
    tied = config.tie_embeddings
    tables = [name for name in state if name in TOKEN_TABLES or name.startswith(VALUE_TABLES)]
    for name in tables:
        if tied and name == "lm_head.weight":
            continue
        old = state[name]  # (rows, C)
        table = torch.cat([old, old.new_zeros(grown - old.size(0), old.size(1))])  # (grown, C)
        table[new_ids] = old[:trained_rows].float().mean(dim=0).to(old.dtype)
        out[name] = table
    if tied:
        out["lm_head.weight"] = out["wte.weight"]
    return config.model_copy(update={"tgt_vocab_size": grown}), out

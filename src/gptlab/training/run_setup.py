"""Two steps of a run's setup that stand alone: the vocabulary size the model gets, and the seeding."""

from __future__ import annotations

import random

import numpy as np
import torch

from gptlab.config import ModelConfig
from gptlab.errors import GptlabError
from gptlab.tokenizers.base import Tokenizer


def resolve_vocab_size(model_cfg: ModelConfig, tokenizer: Tokenizer) -> ModelConfig:
    """A copy of `model_cfg` whose tgt_vocab_size is the tokenizer's when unset; larger is allowed
    (rounded-up embedding tables), smaller is an error."""
    if model_cfg.tgt_vocab_size is None:
        return model_cfg.model_copy(update={"tgt_vocab_size": tokenizer.vocab_size})
    if model_cfg.tgt_vocab_size < tokenizer.vocab_size:
        raise GptlabError(
            f"tgt_vocab_size {model_cfg.tgt_vocab_size} is smaller than the tokenizer's vocabulary "
            f"({tokenizer.vocab_size}); use --tgt_vocab_size {tokenizer.vocab_size} or more, or leave it unset"
        )
    return model_cfg.model_copy()


def seed_everything(seed: int) -> None:
    """Seed every generator that weights, dropout or data order could draw from."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # also seeds every CUDA device

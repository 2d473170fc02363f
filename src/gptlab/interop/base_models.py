"""Base models for fine-tuning: what `--init_from` names, and the whole weights of a LoRA adapter
checkpoint (its base loaded again, fingerprint-checked, with the adapters merged in; gptlab.load
uses them).

`--init_from` takes a local Hugging Face GPT-2 directory (hf_import.py) or a gptlab checkpoint
(any model type; a LoRA adapter checkpoint counts as the model it adapts). This module sits in
the interop layer because a LoRA checkpoint's base may be a Hugging Face directory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from gptlab.config import ModelConfig
from gptlab.errors import GptlabError
from gptlab.interop.hf_import import fine_tuned, fine_tuning_start
from gptlab.tokenizers.base import Tokenizer
from gptlab.training.checkpoint import (
    Checkpoint,
    load_checkpoint,
)
from gptlab.training.lora import read_settings, saved_adapters, with_base

MAX_BASE_DEPTH = 8  # adapters on adapters on ...: a chain this long is a loop of pointers


def fine_tuning_base(
    path: str | Path, model_values: dict[str, Any]
) -> tuple[ModelConfig, Tokenizer, dict[str, torch.Tensor]]:
    """The model config, tokenizer and weights to fine-tune, from a Hugging Face GPT-2 directory
    or a gptlab checkpoint file. `model_values` are the model fields the user set; one that
    contradicts the pretrained model (beyond what fine-tuning may change) is a GptlabError."""
    if not Path(path).is_file():
        return fine_tuning_start(path, model_values)
    checkpoint, state = whole_checkpoint(path)
    config, state = fine_tuned(checkpoint.model_config, state, model_values, f"the checkpoint {path}")
    return config, checkpoint.tokenizer, state


def whole_checkpoint(path: str | Path) -> tuple[Checkpoint, dict[str, torch.Tensor]]:
    """A checkpoint and its whole model's weights: its own, or for a LoRA adapter checkpoint its
    base's with the adapters merged in."""
    checkpoint = load_checkpoint(path)
    return checkpoint, whole_state(checkpoint, path)


def whole_state(checkpoint: Checkpoint, path: str | Path, depth: int = 0) -> dict[str, torch.Tensor]:
    """The whole model's weights of the loaded `checkpoint` (see whole_checkpoint)."""
    settings = read_settings(checkpoint.extra, path)
    if settings is None or settings.merged:
        return checkpoint.model_state
    if depth >= MAX_BASE_DEPTH:
        raise GptlabError(
            f"{path}: its chain of LoRA bases is longer than {MAX_BASE_DEPTH}; save it --lora_save merged"
        )
    base = base_path(settings.base, path)
    cfg = checkpoint.model_config
    if base.is_file():
        base_state = whole_state(load_checkpoint(base), base, depth + 1)
    else:
        _, _, base_state = fine_tuning_start(base, {"seq_len": cfg.seq_len, "dropout": cfg.dropout})
    adapters = saved_adapters(checkpoint.extra, path, checkpoint.model_state)
    return with_base(checkpoint.extra, path, adapters, base_state)


def base_path(recorded: str, checkpoint: str | Path) -> Path:
    """Where the base a LoRA checkpoint records is: the path as --init_from gave it (relative
    to where training ran), or else relative to the checkpoint's directory (a run directory
    moved as a whole). GptlabError when it is in neither place."""
    given = Path(recorded)
    beside = Path(checkpoint).parent / given
    for candidate in (given, beside) if not given.is_absolute() else (given,):
        if candidate.exists():
            return candidate
    raise GptlabError(
        f"{checkpoint} holds LoRA adapters whose base {recorded} is not found (the path --init_from was given, "
        "relative to where training ran or to the checkpoint); restore the base, or re-train with --lora_save merged"
    )

"""torch.compile for a training run: ready the model for tracing, or say why it runs eagerly.

On a CPU, inductor writes C++ and builds it with the machine's compiler; a laptop without one
(no Xcode command-line tools, no build-essential) would fail at the first step with a long
traceback. A run that asks for `compile` there trains eagerly instead, and says so in one line:
the same model and results, only slower steps.
"""

from __future__ import annotations

import os
import shutil

import torch
from torch import nn

from gptlab.config import ModelConfig
from gptlab.models.attention_choice import choose_attention

CPU_COMPILERS = ("c++", "g++", "clang++", "cl")  # what inductor may call; $CXX first


def cpu_compiler() -> str | None:
    """The C++ compiler inductor would find on this machine, or None."""
    for name in (os.environ.get("CXX"), *CPU_COMPILERS):
        if name and shutil.which(name):
            return name
    return None


def compiled(
    model: nn.Module, model_cfg: ModelConfig, rows: int, device: torch.device, dtype: torch.dtype
) -> tuple[nn.Module, str | None]:
    """`model` compiled for training steps of `rows` sequences each, and None; or, on a CPU
    without a C++ compiler, `model` itself and the notice that says so."""
    if device.type == "cpu":
        if cpu_compiler() is None:
            return model, "--compile: no C++ compiler found (set CXX, or install g++ or clang); training without it"
        # A traced step cannot time anything: measure its attention now (models/attention_choice.py).
        choose_attention((rows, model_cfg.n_heads, model_cfg.seq_len, model_cfg.head_dim), dtype)
    return torch.compile(model), None

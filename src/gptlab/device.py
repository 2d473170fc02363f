"""Choosing the device and its numeric settings: the one place gptlab decides where math runs."""

from __future__ import annotations

import contextlib
import re

import torch

from gptlab.errors import GptlabError

_CUDA_NAME = re.compile(r"^cuda(?::(\d+))?$")


def resolve_device(name: str = "auto") -> torch.device:
    """The torch.device for `name`: "auto" (cuda > mps > cpu), "cpu", "cuda", "cuda:N" or "mps".

    Raises GptlabError for an unknown name or a device this machine does not have.
    """
    name = name.strip().lower()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "mps":
        if not _mps_available():
            raise GptlabError("device 'mps' is not available on this machine; use --device cpu or auto")
        return torch.device("mps")
    match = _CUDA_NAME.match(name)
    if match is None:
        raise GptlabError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    if not torch.cuda.is_available():
        raise GptlabError(f"device {name!r} is not available (no CUDA GPU found); use --device cpu or auto")
    index = int(match.group(1) or 0)
    if index >= torch.cuda.device_count():
        raise GptlabError(
            f"device {name!r} does not exist: this machine has {torch.cuda.device_count()} CUDA GPU(s); "
            f"use cuda:0..cuda:{torch.cuda.device_count() - 1}"
        )
    return torch.device("cuda", index)


def configure_backend(device: torch.device) -> None:
    """Allow TF32 matmuls on CUDA: float32 accuracy is not needed to train, and TF32 is much faster."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bfloat16 autocast on GPUs that support it; float32 (a no-op context) everywhere else.

    bfloat16 needs no loss scaling, so the training loop stays the same on every device.
    """
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())

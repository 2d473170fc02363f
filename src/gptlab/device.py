"""Choosing the device and its numeric settings: the one place gptlab decides where math runs."""

from __future__ import annotations

import contextlib
import functools
import math
import re
import time

import torch

from gptlab.errors import GptlabError
from gptlab.host_memory import keep_freed_memory

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
    """Settings for training on `device`. On CUDA, allow TF32 matmuls: float32 accuracy is not
    needed to train, and TF32 is much faster. On CPU, keep freed memory for the next step
    (host_memory.py), as PyTorch's caching allocator does on GPUs."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    elif device.type == "cpu":
        keep_freed_memory()


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_dtype(name: str, device: torch.device, bf16_fast: bool | None = None) -> torch.dtype:
    """The autocast dtype for `name` ("auto", "fp32", "bf16", "fp16") on `device`.

    auto is bfloat16 on GPUs that support it and on CPUs whose bfloat16 matmuls are measured
    faster than their float32 ones (cpu_bf16_speedup; `bf16_fast`, when given, is that answer
    already decided, e.g. by the run being resumed), float32 elsewhere. Raises GptlabError for
    a precision the device cannot train in (fp16 off CUDA, bf16 on an old GPU or on MPS).
    """
    if name == "auto":
        return torch.bfloat16 if device.type == "cpu" and fast_bf16(device, bf16_fast) else usual_dtype(device)
    if name not in DTYPES:
        raise GptlabError(f"unknown dtype {name!r}; use auto, fp32, bf16 or fp16")
    dtype = DTYPES[name]
    if dtype == torch.float16 and device.type != "cuda":
        raise GptlabError(
            f"--dtype fp16 needs a CUDA GPU (its loss scaling is CUDA-only), not {device.type}; use bf16 or fp32"
        )
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise GptlabError("this GPU does not support bfloat16; use --dtype fp16 or fp32")
    if dtype != torch.float32 and device.type == "mps":
        raise GptlabError(f"--dtype {name} is not supported on mps; use --dtype fp32")
    return dtype


def usual_dtype(device: torch.device) -> torch.dtype:
    """The dtype to compute in on `device` when none is named and nothing is measured: bfloat16 on
    GPUs that support it, else float32 (evaluation's default, which must not depend on timing)."""
    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32


def fast_bf16(device: torch.device, decided: bool | None = None) -> bool:
    """Whether `device` computes bfloat16 matmuls at least as fast as float32 ones: `decided` where
    that was decided already (by the run being resumed), else measured on a CPU (cpu_bf16_speedup),
    assumed elsewhere."""
    if decided is not None:
        return decided
    return device.type != "cpu" or cpu_bf16_speedup() > 1


@functools.cache
def cpu_bf16_speedup(size: int = 256, repeats: int = 3) -> float:
    """How many times faster this CPU multiplies two (size x size) bfloat16 matrices than float32
    ones: best of `repeats`, measured once per process.

    A CPU with AVX-512 BF16 or AMX runs bfloat16 matmuls faster (cpu-10min took 1.5x the steps
    on one); without them PyTorch converts every element, measured 45 to 70 times slower on an AVX2
    EPYC, so a run that assumed bf16 everywhere would crawl.
    """
    return matmul_seconds(torch.float32, size, repeats) / matmul_seconds(torch.bfloat16, size, repeats)


def matmul_seconds(dtype: torch.dtype, size: int, repeats: int) -> float:
    """Seconds of the best of `repeats` products of two (size x size) matrices in `dtype`, after
    one to warm up the kernels and threads. The matrices are filled without drawing random
    numbers: measuring must not move the RNG that a resumed run replays."""
    a = torch.arange(size * size, dtype=torch.float32).reshape(size, size).div_(size * size).to(dtype)
    b = a.t().contiguous()
    torch.mm(a, b)
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - started)
    return best


def weights_dtype(name: str, device: torch.device) -> torch.dtype:
    """The dtype to hold a model's weights in for generation: "fp32" (exact), "bf16", "fp16" or
    "int8" (torch.qint8: int8 weights for CPU kernels, gptlab.models.int8).

    Unlike training under autocast there is no float32 copy: the weights themselves are rounded,
    which halves (quarters, for int8) the memory that every decoding step reads; whether that is
    faster depends on the model's size and the processor's kernels. Raises GptlabError for a dtype
    `device` lacks.
    """
    if name == "int8":
        if device.type != "cpu":
            raise GptlabError(
                f"--dtype int8 runs on CPUs only (fbgemm kernels), not {device.type}; use bf16 or fp16 there"
            )
        return torch.qint8
    if name not in DTYPES:
        raise GptlabError(f"unknown dtype {name!r}; use fp32, bf16, fp16 or int8")
    dtype = DTYPES[name]
    if dtype == torch.float16 and device.type == "cpu":
        raise GptlabError("--dtype fp16 is for GPUs; on CPU use --dtype bf16 (or fp32)")
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise GptlabError("this GPU does not support bfloat16; use --dtype fp16 or fp32")
    if dtype == torch.bfloat16 and device.type == "mps":
        raise GptlabError("--dtype bf16 is not supported on mps; use --dtype fp16 or fp32")
    return dtype


def sum_dtype(device: torch.device) -> torch.dtype:
    """The dtype to sum losses and counts in on `device`: float64, or float32 on MPS, which has none."""
    return torch.float32 if device.type == "mps" else torch.float64


def autocast(device: torch.device, dtype: torch.dtype | None = None) -> contextlib.AbstractContextManager:
    """Autocast to `dtype` on `device` (default: usual_dtype(device)); float32 is a no-op context.

    Matmuls run in the low precision; weights, and the losses the models compute, stay float32.
    """
    dtype = dtype or usual_dtype(device)
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())

"""Choosing, by measurement, how a CPU training step computes causal attention.

PyTorch's fused CPU attention (scaled_dot_product_attention) never holds the (T, T) scores, and
its forward pass is fast; but its backward pass in bf16 is slow at short contexts. On this
project's 2-core machines, for cpu-10min's 32 x 4 heads x 128 tokens x 64, forward and backward
took 21 ms against 11 ms for the explicit softmax(q kᵀ / √d) v, whose scores at T = 128 are only
2 MB a layer; at T = 1024 the explicit form is 4 times slower. Which one wins depends on the
shape, the dtype, the thread count and the processor, so `causal_attention` times both, once
per shape in the process, on random tensors of that shape (a fraction of a second, with a
generator of its own so that the run's random numbers are untouched), and keeps the faster.

Only a CPU training step in a 16-bit dtype is measured: in float32 the fused kernel's backward
is already the faster one, and a step without gradients or on a GPU always takes the fused kernel.
A step that torch.compile traces cannot time anything: `choose_attention` measures a shape
beforehand (the trainer calls it before compiling), and a traced step takes the fused kernel for
a shape not measured. The two agree to rounding (tests/test_attention_choice.py).
"""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

# The explicit form must be at least this much faster to be chosen: a close call is not worth
# leaving the kernel that never holds the scores, and it keeps the choice stable between runs.
MARGIN = 1.2
ROUNDS = 3  # timed forward-and-backward passes of each candidate; the best counts

_CHOSEN: dict[tuple, bool] = {}  # (shape, dtype, threads) -> whether the explicit form is faster


def explicit_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ / √hs, causal) v, holding the (T, T) scores: q, k, v (B, nh, T, hs)."""
    T = q.size(-2)
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu_(1)  # True above the diagonal
    scores = (q @ k.transpose(-2, -1)).mul_(1 / math.sqrt(q.size(-1))).masked_fill_(future, float("-inf"))
    return scores.softmax(dim=-1) @ v


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal self-attention of q, k, v (B, nh, T, hs), by whichever form is faster here."""
    if _measured_worthwhile(q) and _explicit_is_faster(q):
        return explicit_causal_attention(q, k, v)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def choose_attention(shape: tuple[int, int, int, int], dtype: torch.dtype) -> bool:
    """Measure now which form a CPU training step of q's `shape` (B, nh, T, hs) and `dtype` will
    take, for a step that torch.compile is about to trace; returns whether it is the explicit one."""
    like = torch.empty(shape, dtype=dtype, requires_grad=True)
    return _measured_worthwhile(like) and _explicit_is_faster(like)


def _measured_worthwhile(q: torch.Tensor) -> bool:
    return (
        q.device.type == "cpu"
        and q.dtype in (torch.bfloat16, torch.float16)
        and torch.is_grad_enabled()
        and q.requires_grad
    )


def _explicit_is_faster(q: torch.Tensor) -> bool:
    key = (tuple(q.shape), q.dtype, torch.get_num_threads())
    if torch.compiler.is_compiling():  # nothing can be timed while tracing
        return _CHOSEN.get(key, False)
    if key not in _CHOSEN:
        fused = _seconds(F.scaled_dot_product_attention, q, is_causal=True)
        explicit = _seconds(explicit_causal_attention, q)
        _CHOSEN[key] = explicit * MARGIN < fused
    return _CHOSEN[key]


def _seconds(attention, like: torch.Tensor, **kwargs) -> float:
    """The best time of one forward and backward pass of `attention` on random tensors like `like`."""
    generator = torch.Generator().manual_seed(0)  # never the run's own random numbers
    q, k, v, grad = (torch.randn(like.shape, generator=generator).to(like.dtype) for _ in range(4))
    for t in (q, k, v):
        t.requires_grad_(True)
    best = math.inf
    for round_ in range(ROUNDS + 1):  # the first pass warms up
        started = time.perf_counter()
        attention(q, k, v, **kwargs).backward(grad)
        if round_:
            best = min(best, time.perf_counter() - started)
    return best


def forget_attention_choices() -> None:
    """Empty the process's cache (the next training step measures again)."""
    _CHOSEN.clear()

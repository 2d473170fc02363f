"""Choosing the memory order of each matrix shape for the native decoding step, by measurement.

native_step.c computes a product in either memory order of the weights: (out, in), as nn.Linear
stores them, with four dot products at a time, or (in, out), adding each input's row to the
outputs. Which is faster depends on the shape and the machine: on the AMX Xeon the (in, out)
order read a 128 x 8192 output head 15 % faster inside a step, and the small layers' matrices
15-30 % slower. A product timed alone, its weights hot in the cache, does not tell: inside a step
every weight comes back from farther away. So `choose_memory_orders` times whole native steps:
it flips one shape's matrices to the other order, keeps the flip if steps got faster, and moves
on to the next shape, within a time budget. A model whose step is too slow to time a few of them
in that budget (GPT-2's shape: its products are bound by memory in either order) is left as it is.
"""

from __future__ import annotations

import time

import torch
from torch import nn

from gptlab.models.gpt import GPT
from gptlab.models.native_step import NativeDecodeStep, native_library, step_linears

STEPS = 16  # steps a timing pass decodes (its cache stays short: the products dominate)
ROUNDS = 3  # passes per order; the fastest counts
MIN_GAIN = 0.02  # a flip must make steps this much faster to be kept: less is timing noise
MAX_TOTAL_S = 0.5  # the whole choice, all shapes together
MAX_STEP_S = 0.004  # a step slower than this is not timed at all


def matrices_by_shape(model: GPT) -> dict[tuple[int, int], list[nn.Linear]]:
    """The linear layers the native step reads, grouped by (in, out) shape; the head last."""
    groups: dict[tuple[int, int], list[nn.Linear]] = {}
    for linear in step_linears(model):
        groups.setdefault((linear.in_features, linear.out_features), []).append(linear)
    return groups


@torch.no_grad()
def flip(linears: list[nn.Linear]) -> None:
    """Store each weight in the other memory order (same shape and values; a tied table follows)."""
    for linear in linears:
        w = linear.weight.data
        linear.weight.data = w.t().contiguous().t() if w.is_contiguous() else w.contiguous()


@torch.inference_mode()
def seconds_per_step(model: GPT, steps: int = STEPS, rounds: int = ROUNDS) -> float:
    """The fastest of `rounds` passes of `steps` native steps, per step, from an empty cache."""
    step, cache = NativeDecodeStep(model, native_library()), model.new_kv_cache(1, max_len=steps)
    ids, best = torch.zeros(1, dtype=torch.long), float("inf")
    for _ in range(rounds):
        cache.reset()
        started = time.perf_counter()
        for _ in range(steps):
            step(ids, cache)
        best = min(best, (time.perf_counter() - started) / steps)
    return best


def choose_memory_orders(model: GPT, max_total_s: float = MAX_TOTAL_S) -> dict[tuple[int, int], str]:
    """Give each matrix shape of `model` (one the native step takes) the memory order in which its
    steps ran fastest; returns shape -> "(out, in)" or "(in, out)", the order each shape ends in."""
    deadline = time.perf_counter() + max_total_s
    groups = matrices_by_shape(model)
    if model.config.seq_len >= STEPS and seconds_per_step(model, steps=2, rounds=1) <= MAX_STEP_S:
        best = seconds_per_step(model)
        for linears in groups.values():
            if time.perf_counter() > deadline:
                break
            flip(linears)
            flipped = seconds_per_step(model)
            if flipped < best * (1 - MIN_GAIN):
                best = flipped
            else:
                flip(linears)
    return {shape: "(out, in)" if ls[0].weight.is_contiguous() else "(in, out)" for shape, ls in groups.items()}

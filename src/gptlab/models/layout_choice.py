"""Choosing each matrix's layout by measurement, on the machine that decodes.

Which way of computing a one-row product is fastest (gptlab.models.matvec) depends on the
matrix's shape, the thread count and the processor's kernels, so no fixed rule holds on every
machine. `choose_layouts` times every candidate layout on the model's own matrices of each
distinct shape, for a few milliseconds, and keeps the fastest. The choice is cached per shape in
the process: a second model of the same shapes (or the same one made ready again) is not timed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import nn

from gptlab.models.decode_step import product
from gptlab.models.matvec import Layout, MatVecLinear, default_layout, layouts_for

# Each candidate runs for at least this long (and at least MIN_ROUNDS passes); the best pass counts.
# On a busy machine a pass may wait for a core: past MAX_TIME_PER_CANDIDATE_S, one pass is enough.
TIME_PER_CANDIDATE_S = 0.004
MAX_TIME_PER_CANDIDATE_S = 0.05
MIN_ROUNDS = 3
# All shapes together: past this, the shapes not yet measured keep default_layout (uncached).
MAX_TOTAL_S = 1.0


@dataclass(frozen=True)
class LayoutChoice:
    """The layout kept for one matrix shape, and what each candidate took per product."""

    n_in: int
    n_out: int
    count: int  # matrices of this shape in the model
    layout: Layout
    seconds: dict[str, float]  # candidate layout -> best time of one product; empty: not measured


_CHOSEN: dict[tuple, LayoutChoice] = {}


def _shape_key(layer: MatVecLinear, splits: int) -> tuple:
    w = layer.weight
    return (layer.in_features, layer.out_features, layer.bias is not None, w.dtype, w.device.type, splits)


@torch.no_grad()  # not inference_mode: a relaid weight must stay usable for training
def choose_layouts(model: nn.Module, max_total_s: float | None = None) -> list[LayoutChoice]:
    """Give every MatVecLinear of `model` the fastest layout for its shape; returns the choices,
    one per distinct shape (from the process's cache when that shape was measured before).

    Measuring stops after about max_total_s (default MAX_TOTAL_S; a machine so busy that a few products take that long
    gives no useful timings anyway); shapes left unmeasured keep default_layout and are not cached.
    """
    splits = torch.get_num_threads()
    groups: dict[tuple, list[MatVecLinear]] = {}
    for module in model.modules():
        if isinstance(module, MatVecLinear):
            groups.setdefault(_shape_key(module, splits), []).append(module)
    deadline = time.perf_counter() + (MAX_TOTAL_S if max_total_s is None else max_total_s)
    choices = []
    for key, layers in groups.items():
        if key in _CHOSEN:
            choice = _CHOSEN[key]
        elif time.perf_counter() < deadline:
            choice = _CHOSEN[key] = _measure(layers, splits, deadline)
        else:
            n_in, n_out = layers[0].in_features, layers[0].out_features
            choice = LayoutChoice(n_in, n_out, len(layers), default_layout(n_in, n_out, splits), {})
        for layer in layers:
            layer.set_layout(choice.layout, splits)
        choices.append(choice)
    return choices


def _measure(layers: list[MatVecLinear], splits: int, deadline: float) -> LayoutChoice:
    """Time one pass over `layers` (all of one shape) in each candidate layout; keep the fastest.

    The model's own matrices are timed, all of them in turn, so that the weights come from
    wherever decoding will find them (cache or memory) and no copy of a large matrix is made
    beyond the one a change of layout needs. Past the deadline, the remaining candidates are skipped.
    """
    first = layers[0]
    x = torch.zeros(1, first.in_features, dtype=first.weight.dtype, device=first.weight.device)
    seconds = {}
    for layout in layouts_for(first.in_features, first.out_features, splits):
        if seconds and time.perf_counter() > deadline:
            break
        for layer in layers:
            layer.set_layout(layout, splits)
        products = [product(layer) for layer in layers]  # as a decoding step computes them
        for multiply in products:  # warm up: the first call may allocate or touch fresh pages
            multiply(x)
        best, rounds, started = float("inf"), 0, time.perf_counter()
        while _more_rounds(rounds, time.perf_counter() - started):
            begin = time.perf_counter()
            for multiply in products:
                multiply(x)
            best, rounds = min(best, time.perf_counter() - begin), rounds + 1
        seconds[layout] = best / len(layers)
    fastest = min(seconds, key=seconds.__getitem__)
    return LayoutChoice(first.in_features, first.out_features, len(layers), fastest, seconds)


def _more_rounds(rounds: int, elapsed: float) -> bool:
    if rounds == 0:
        return True
    return elapsed < MAX_TIME_PER_CANDIDATE_S and (rounds < MIN_ROUNDS or elapsed < TIME_PER_CANDIDATE_S)


def forget_layout_choices() -> None:
    """Empty the process's cache (the next choose_layouts measures again)."""
    _CHOSEN.clear()

"""How one optimizer step's batch is cut: into micro-batches (gradient accumulation) and, within
each micro-batch, into rows per rank (data parallelism).

A step consumes `batch_size * grad_accum_steps` windows, drawn by data.iterate_batches exactly as
one big batch would be. Micro-batch i is rows [i*batch_size, (i+1)*batch_size) of it, and rank r
takes rows r::world_size of each micro-batch, so the sequence of step batches does not depend on
how many micro-batches or ranks share the work; nor, without dropout, does the loss curve (the
dropout masks a row gets depend on where it runs).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from gptlab.errors import GptlabError


@dataclass(frozen=True)
class MicroBatch:
    """One forward/backward's rows on this rank, and how many of their targets count in the loss.

    targets == 0 marks a stand-in row for a rank whose share of a short last batch is empty: it
    still runs forward/backward (the other ranks wait for its gradients) but weighs nothing.
    """

    batch: Any
    targets: int


def accumulation_steps(batch_size: int, seq_len: int, grad_accum_steps: int, total_batch_tokens: int | None) -> int:
    """Micro-batches per optimizer step: grad_accum_steps, or what total_batch_tokens implies.

    batch_size is one micro-batch of all ranks together (each rank holds batch_size / world_size).
    """
    if total_batch_tokens is None:
        return grad_accum_steps
    micro_tokens = batch_size * seq_len
    if total_batch_tokens % micro_tokens:
        raise GptlabError(
            f"total_batch_tokens {total_batch_tokens} is not a multiple of batch_size*seq_len = {micro_tokens}; "
            f"use a multiple such as {max(total_batch_tokens // micro_tokens, 1) * micro_tokens}"
        )
    return total_batch_tokens // micro_tokens


def check_divides(batch_size: int, world_size: int) -> None:
    """GptlabError unless every rank gets the same number of rows of a full micro-batch."""
    if batch_size % world_size:
        raise GptlabError(
            f"batch_size {batch_size} is not divisible by the {world_size} processes (each takes an equal share); "
            f"use a batch_size that is a multiple of {world_size}"
        )


class RankMicroBatches:
    """A view of a dataset for data.iterate_batches: batch(indices of one step batch) returns this
    rank's list of MicroBatch, reading only this rank's rows from disk."""

    def __init__(self, dataset: Any, micro_batch: int, rank: int, world_size: int, count_targets: Callable[[Any], int]):
        self.dataset, self.micro_batch = dataset, micro_batch
        self.rank, self.world_size = rank, world_size
        self.count_targets = count_targets

    def __len__(self) -> int:
        return len(self.dataset)

    def batch(self, indices: np.ndarray) -> list[MicroBatch]:
        indices = np.asarray(indices)
        micro_batches = []
        for start in range(0, len(indices), self.micro_batch):
            rows = indices[start : start + self.micro_batch][self.rank :: self.world_size]
            if len(rows) == 0:
                micro_batches.append(MicroBatch(self.dataset.batch(indices[start : start + 1]), targets=0))
            else:
                batch = self.dataset.batch(rows)
                micro_batches.append(MicroBatch(batch, self.count_targets(batch)))
        return micro_batches

"""Prepared token shards -> training windows and batches, read through memory maps."""

from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view

from gptlab.data.prepare import numpy_dtype, read_meta
from gptlab.errors import GptlabError


class TokenDataset(torch.utils.data.Dataset):
    """Non-overlapping windows of a prepared directory's tokens.

    Window i covers tokens [i*seq_len, i*seq_len + seq_len + 1): x is its first seq_len tokens
    and y the same shifted by one, so y[t] is the token that follows x[:t+1]. Windows may span
    shard boundaries. Shards are memory-mapped, so the corpus never has to fit in memory.
    """

    def __init__(self, prepared_dir: str | Path, seq_len: int):
        if seq_len <= 0:
            raise GptlabError(f"seq_len must be positive, got {seq_len}")
        self.prepared_dir = Path(prepared_dir)
        self.meta: dict[str, Any] = read_meta(self.prepared_dir)
        self.seq_len = seq_len
        self.num_tokens: int = self.meta["num_tokens"]
        if self.num_tokens == 0:
            raise GptlabError(f"{self.prepared_dir} holds no tokens; prepare non-empty text")
        if self.num_tokens < seq_len + 1:
            raise GptlabError(
                f"{self.prepared_dir} has {self.num_tokens} tokens, fewer than one window of seq_len {seq_len} "
                f"needs ({seq_len + 1}); use more data or a seq_len below {self.num_tokens}"
            )
        dtype = numpy_dtype(self.meta)
        self.shards = [
            np.memmap(self.prepared_dir / name, dtype=dtype, mode="r", shape=(length,))
            for name, length in zip(self.meta["shards"], self.meta["shard_lengths"])
        ]
        self._check_ids(int(self.meta["vocab_size"]))
        # shard k holds global tokens [shard_starts[k], shard_starts[k + 1])
        self.shard_starts = np.concatenate([[0], np.cumsum(self.meta["shard_lengths"])]).astype(np.int64)
        self.offset = 0  # where window 0 starts (shifted)

    def shifted(self, offset: int) -> TokenDataset:
        """The same tokens and number of windows, window i now starting at i*seq_len + offset
        (0 <= offset < seq_len); the last window, which would run past the end, ends at the last token."""
        if not 0 <= offset < self.seq_len:
            raise GptlabError(f"a window offset must be in 0..{self.seq_len - 1}, got {offset}")
        view = copy.copy(self)  # shares the memory maps
        view.offset = offset
        return view

    def _check_ids(self, vocab_size: int) -> None:
        """GptlabError unless every id is below `vocab_size`: an id past the embedding table is an
        IndexError traceback on CPU and a device-side assert on a GPU, mid-run."""
        for name, shard in zip(self.meta["shards"], self.shards):
            largest = int(shard.max())  # one sequential pass over the memory map
            if largest >= vocab_size:
                raise GptlabError(
                    f"shard {self.prepared_dir / name} holds token id {largest}, but its tokenizer has only "
                    f"{vocab_size} ids; delete {self.prepared_dir} and prepare the data again"
                )

    @property
    def bytes_per_token(self) -> float:
        """UTF-8 bytes of source text per token: converts nats/token into bits per byte."""
        return self.meta["num_bytes"] / self.num_tokens

    def __len__(self) -> int:
        return (self.num_tokens - 1) // self.seq_len

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"window {index} out of range for {len(self)} windows")
        x, y = self.batch(np.array([index % len(self)]))
        return x[0], y[0]  # (T,), (T,)

    def batch(self, indices: np.ndarray | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x, y of shape (B, T) int64 for the windows `indices` (B of them, each in range)."""
        starts = np.asarray(indices, dtype=np.int64) * self.seq_len + self.offset
        starts = np.minimum(starts, self.num_tokens - self.seq_len - 1)  # a shifted last window
        rows = self._read_rows(starts)  # (B, T+1)
        rows = torch.from_numpy(rows.astype(np.int64))
        return rows[:, :-1], rows[:, 1:]  # (B, T), (B, T)

    def _read_rows(self, starts: np.ndarray) -> np.ndarray:
        """Tokens [s, s + seq_len + 1) for each global start s, as one (B, T+1) array."""
        width = self.seq_len + 1
        rows = np.empty((len(starts), width), dtype=self.shards[0].dtype)
        first = np.searchsorted(self.shard_starts, starts, side="right") - 1
        last = np.searchsorted(self.shard_starts, starts + width - 1, side="right") - 1
        inside = first == last
        for k in np.unique(first[inside]):
            picked = inside & (first == k)
            # All rows inside shard k in one vectorised gather over a strided view (no index array).
            windows = sliding_window_view(self.shards[k], width)  # (len_k - T, T+1), a view
            rows[picked] = windows[starts[picked] - self.shard_starts[k]]
        for row in np.flatnonzero(~inside):
            rows[row] = self._read_span(int(starts[row]), int(starts[row]) + width)
        return rows

    def _read_span(self, start: int, stop: int) -> np.ndarray:
        """Global tokens [start, stop) across however many shards they touch."""
        pieces = []
        for k, shard in enumerate(self.shards):
            lo, hi = max(start, self.shard_starts[k]), min(stop, self.shard_starts[k + 1])
            if lo < hi:
                pieces.append(shard[lo - self.shard_starts[k] : hi - self.shard_starts[k]])
        return np.concatenate(pieces)


def num_batches(dataset: TokenDataset, batch_size: int) -> int:
    """Batches in one epoch: ceil(len(dataset) / batch_size)."""
    return math.ceil(len(dataset) / batch_size)


def iterate_batches(
    dataset: TokenDataset, batch_size: int, shuffle: bool, seed: int, epoch: int, start_batch: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of (x, y) batches, each (B, T) int64; every window appears exactly once and
    the last batch may be smaller.

    With `shuffle` the window order is a permutation drawn from (seed, epoch) alone, so a
    resumed run that passes `start_batch` sees exactly the batches an uninterrupted run would.
    """
    if batch_size <= 0:
        raise GptlabError(f"batch_size must be positive, got {batch_size}")
    if start_batch < 0:
        raise GptlabError(f"start_batch must be >= 0, got {start_batch}")
    if shuffle:
        generator = torch.Generator().manual_seed(_epoch_seed(seed, epoch))
        order = torch.randperm(len(dataset), generator=generator).numpy()
    else:
        order = np.arange(len(dataset))
    for first in range(start_batch * batch_size, len(order), batch_size):
        yield dataset.batch(order[first : first + batch_size])


def window_offset(seed: int, epoch: int, seq_len: int) -> int:
    """Where epoch `epoch`'s windows start (DatasetConfig.shift_windows): 0 in epoch 1, then a
    number in 0..seq_len-1 drawn from (seed, epoch) alone, so that a resumed run cuts the same windows."""
    if epoch <= 1:
        return 0
    return _epoch_seed(seed, epoch, purpose="offset") % seq_len


def _epoch_seed(seed: int, epoch: int, purpose: str = "shuffle") -> int:
    # A hash, not seed + epoch, so (seed, epoch) and (seed + 1, epoch - 1) differ.
    digest = hashlib.sha256(f"gptlab-{purpose}:{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1

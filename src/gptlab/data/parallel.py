"""Tokenizing groups of segments, in this process or in worker processes, results in input order.

Order is what makes the output independent of the worker count: results are taken from the
workers in the order the groups were submitted, whichever finishes first. At most a few groups
per worker are in flight, so memory stays bounded however long the stream is.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool

import numpy as np

from gptlab.data.sources import Segment
from gptlab.errors import GptlabError
from gptlab.tokenizers.base import Tokenizer

GROUPS_IN_FLIGHT_PER_WORKER = 2

# The tokenizer of a worker process, rebuilt once from its files by _start_worker: a worker
# serves one prepare() call and nothing else, so this is its whole state.
_worker_tokenizer: Tokenizer | None = None


def encode_group(tokenizer: Tokenizer, segments: list[tuple[str, bool]], dtype: str) -> tuple[np.ndarray, list[int]]:
    """The ids of (text, ends_document) segments, an <EOS> after each document's end, as one
    array of `dtype`, and how many ids each segment gave. Ids are checked against the vocabulary."""
    pieces: list[np.ndarray] = []
    counts: list[int] = []
    for text, ends_document in segments:
        ids = list(tokenizer.encode(text)) if text else []
        if ends_document:
            ids.append(tokenizer.eos_id)
        pieces.append(np.asarray(ids, dtype=np.int64))
        counts.append(len(ids))
    ids = np.concatenate(pieces) if pieces else np.empty(0, dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= tokenizer.vocab_size):
        bad = ids[(ids < 0) | (ids >= tokenizer.vocab_size)][0]
        raise GptlabError(
            f"tokenizer produced id {bad} outside its vocabulary of {tokenizer.vocab_size}; check its files"
        )
    return ids.astype(dtype), counts


def encode_groups(
    tokenizer: Tokenizer, groups: Iterable[list[Segment]], dtype: str, workers: int
) -> Iterator[tuple[list[Segment], np.ndarray, list[int]]]:
    """(group, ids, per-segment counts) for each group, in order; `workers` > 1 runs
    encode_group in that many processes."""
    if workers <= 1:
        for group in groups:
            yield (group, *encode_group(tokenizer, _plain(group), dtype))
        return
    pool = ProcessPoolExecutor(
        max_workers=workers,
        initializer=_start_worker,
        initargs=(type(tokenizer), tokenizer.to_files()),
    )
    pending: deque[tuple[list[Segment], Future]] = deque()
    try:
        for group in groups:
            pending.append((group, pool.submit(_encode_in_worker, _plain(group), dtype)))
            if len(pending) >= GROUPS_IN_FLIGHT_PER_WORKER * workers:
                yield _result(*pending.popleft())
        while pending:
            yield _result(*pending.popleft())
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _plain(group: list[Segment]) -> list[tuple[str, bool]]:
    return [(segment.text, segment.ends_document) for segment in group]  # what a worker needs, no more


def _result(group: list[Segment], future: Future) -> tuple[list[Segment], np.ndarray, list[int]]:
    try:
        ids, counts = future.result()
    except BrokenProcessPool:
        raise GptlabError("a tokenizer worker process died (out of memory?); retry with fewer --workers") from None
    return group, ids, counts


def _start_worker(tokenizer_class: type[Tokenizer], files: dict[str, bytes]) -> None:
    global _worker_tokenizer
    _worker_tokenizer = tokenizer_class.from_files(files)


def _encode_in_worker(segments: list[tuple[str, bool]], dtype: str) -> tuple[np.ndarray, list[int]]:
    assert _worker_tokenizer is not None, "worker started without its tokenizer"
    return encode_group(_worker_tokenizer, segments, dtype)

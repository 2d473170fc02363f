"""Learning byte-level BPE merges from a corpus, in time linear in the corpus.

1. Pre-split every document with the split regex and count the unique chunks (chunk -> count):
   memory grows with the number of unique chunks, never with the corpus.
2. Count every adjacent token pair once, weighted by its chunk's count, and remember which
   chunks hold each pair.
3. Repeatedly merge the most frequent pair: rewrite only the chunks that hold it, update the
   pair counts of those chunks, and find the next best pair with a lazily cleaned max-heap.

A chunk is stored as a `str` with one character per token id (`chr(id)`), so that merging the
pair (a, b) into z in a chunk is one `str.replace(chr(a) + chr(b), chr(z))` in C, which merges
left to right without overlaps exactly as BPE does; a pair is a 2-character string.
"""

from __future__ import annotations

import heapq
from collections import Counter, defaultdict
from collections.abc import Iterable
from operator import add

import regex
from tqdm import tqdm

from gptlab.tokenizers.base import SPECIAL_TOKENS
from gptlab.tokenizers.byte_level import utf8_bytes


def count_chunks(texts: Iterable[str], pattern: regex.Pattern) -> Counter[str]:
    """How often each pre-split chunk occurs; chunks never cross documents."""
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(pattern.findall(text))
    return counts


def learn_merges(chunk_counts: dict[str, int], n_merges: int, progress: bool = True) -> list[tuple[int, int]]:
    """Up to `n_merges` merges (a, b) in rank order; merge i creates token id 256 + i.

    The most frequent pair wins; ties go to the smallest (a, b), so the result is deterministic.
    Stops early when no pair occurs twice. A pair whose bytes already form a token (two paths
    to the same bytes) is skipped, so every token's bytes are unique; so is one that would spell
    a special token (<EOS>, ...), which vocab.json could not hold beside the special token itself.
    """
    words, counts = _chunks_as_strings(chunk_counts)
    pair_counts, holders = _count_pairs(words, counts)
    # Max-heap by count, then smallest pair. Counts of existing pairs only ever fall, so an
    # entry may be stale-high: when one reaches the top with an old count, it is re-queued.
    heap = [(-count, pair) for pair, count in pair_counts.items()]
    heapq.heapify(heap)

    token_bytes = [bytes([b]) for b in range(256)]
    known = set(token_bytes) | {name.encode() for name in SPECIAL_TOKENS}
    merges: list[tuple[int, int]] = []
    bar = tqdm(total=n_merges, unit="merge", disable=not progress, desc="BPE merges")
    while len(merges) < n_merges and heap:
        negative_count, pair = heap[0]
        count = pair_counts[pair]
        if count != -negative_count:
            if count > 0:
                heapq.heapreplace(heap, (-count, pair))
            else:
                heapq.heappop(heap)
            continue
        if count < 2:
            break
        heapq.heappop(heap)
        a, b = ord(pair[0]), ord(pair[1])
        merged_bytes = token_bytes[a] + token_bytes[b]
        if merged_bytes in known:  # a guard: the tokens' bytes must stay unique for tiktoken's ranks
            continue
        new_id = len(token_bytes)
        token_bytes.append(merged_bytes)
        known.add(merged_bytes)
        merges.append((a, b))
        _apply_merge(pair, chr(new_id), words, counts, pair_counts, holders, heap)
        bar.update()
    bar.close()
    return merges


def _chunks_as_strings(chunk_counts: dict[str, int]) -> tuple[list[str], list[int]]:
    """Each unique chunk's UTF-8 bytes as a string of byte values (latin-1 maps byte b to chr(b)),
    and its count; chunks whose bytes coincide (after the surrogate policy) are counted together."""
    byte_counts: Counter[bytes] = Counter()
    for chunk, count in chunk_counts.items():
        byte_counts[utf8_bytes(chunk)] += count
    return [chunk.decode("latin-1") for chunk in byte_counts], list(byte_counts.values())


def _count_pairs(words: list[str], counts: list[int]) -> tuple[defaultdict[str, int], defaultdict[str, list[int]]]:
    """Every adjacent pair's count (weighted by its chunk's count), and the chunks holding it."""
    pair_counts: defaultdict[str, int] = defaultdict(int)
    holders: defaultdict[str, list[int]] = defaultdict(list)
    for chunk_id, (word, count) in enumerate(zip(words, counts)):
        for pair in map(add, word, word[1:]):
            pair_counts[pair] += count
            holders[pair].append(chunk_id)
    return pair_counts, holders


def _apply_merge(pair, new_char, words, counts, pair_counts, holders, heap) -> None:
    """Rewrite every chunk holding `pair`, updating pair counts, holders and the heap.
    Holder lists may hold a chunk twice or a chunk that lost the pair: both are skipped cheaply."""
    first, second = pair
    fresh: defaultdict[str, list[int]] = defaultdict(list)  # new pairs (they hold new_char) -> chunk ids
    for chunk_id in holders.pop(pair):
        old = words[chunk_id]
        at = old.find(pair)
        if at < 0:  # a stale holder: an earlier merge already consumed the pair here
            continue
        count = counts[chunk_id]
        if old.find(pair, at + 2) < 0:
            # The common case, one occurrence: only the pairs beside it change.
            words[chunk_id] = old.replace(pair, new_char)
            if at:
                left = old[at - 1]
                pair_counts[left + first] -= count
                left_pair = left + new_char
                pair_counts[left_pair] += count
                fresh[left_pair].append(chunk_id)
            if at + 2 < len(old):
                right = old[at + 2]
                pair_counts[second + right] -= count
                right_pair = new_char + right
                pair_counts[right_pair] += count
                fresh[right_pair].append(chunk_id)
            continue
        new = old.replace(pair, new_char)
        words[chunk_id] = new
        for old_pair in map(add, old, old[1:]):
            if old_pair != pair:
                pair_counts[old_pair] -= count
        for new_pair in map(add, new, new[1:]):
            pair_counts[new_pair] += count
            if new_char in new_pair:
                fresh[new_pair].append(chunk_id)
    pair_counts[pair] = 0  # every occurrence is merged
    holders.update(fresh)
    for new_pair in fresh:
        heapq.heappush(heap, (-pair_counts[new_pair], new_pair))

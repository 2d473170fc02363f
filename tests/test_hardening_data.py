"""Bad data gives one clear error, and preparing leaves nothing beside the user's text: token ids
past the vocabulary, JSON nested too deeply, the lock files of concurrent preparers."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from gptlab.data import TokenDataset, prepare, resolve_data
from gptlab.data.pairs import read_pairs
from gptlab.data.prepare import _exclusive_lock
from gptlab.errors import GptlabError

from helpers import ByteTokenizer

DEEP_JSON = "[" * 100_000 + "]" * 100_000  # deeper than Python's recursion limit


def test_token_ids_past_the_vocabulary_are_refused_when_opening(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("hello world, " * 50, encoding="utf-8")
    out = prepare([tmp_path / "a.txt"], ByteTokenizer(), tmp_path / "prep", progress=False, workers=1)
    TokenDataset(out, seq_len=8)  # intact data opens
    shard = next(out.glob("tokens_*.bin"))
    ids = np.fromfile(shard, dtype=np.uint16)
    ids[len(ids) // 2] = 65535  # the tokenizer has 260 ids
    ids.tofile(shard)
    with pytest.raises(
        GptlabError, match=rf"shard .*{shard.name} holds token id 65535, but its tokenizer has only 260 ids"
    ):
        TokenDataset(out, seq_len=8)


def test_deeply_nested_jsonl_line_is_a_bad_line(tmp_path: Path) -> None:
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text('{"text": "fine"}\n' + DEEP_JSON + "\n", encoding="utf-8")
    with pytest.raises(GptlabError, match=rf"{corpus.name}:2 is nested too deeply"):
        prepare([corpus], ByteTokenizer(), tmp_path / "prep", progress=False, workers=1, jsonl_field="text")


def test_deeply_nested_pair_line_is_a_bad_line(tmp_path: Path) -> None:
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text('{"source": "ab", "target": "ba"}\n' + DEEP_JSON + "\n", encoding="utf-8")
    with pytest.raises(GptlabError, match="line 2: JSON nested too deeply"):
        read_pairs(pairs)
    with pytest.warns(UserWarning, match="skipped 1 bad line"):
        assert read_pairs(pairs, skip_bad_lines=True) == [("ab", "ba")]


def test_preparing_on_the_fly_leaves_no_lock_file(tmp_path: Path) -> None:
    text = tmp_path / "corpus.txt"
    text.write_text("some text to cache\n" * 20, encoding="utf-8")
    cache = resolve_data(text, ByteTokenizer(), progress=False, workers=1)
    assert cache.is_dir()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["corpus.txt", cache.name])


def test_lock_excludes_concurrent_holders_although_its_file_is_removed(tmp_path: Path) -> None:
    target = tmp_path / "cache"
    holders, overlaps = [0], []

    def worker() -> None:
        for _ in range(30):
            with _exclusive_lock(target):
                holders[0] += 1
                overlaps.append(holders[0])
                time.sleep(0.0005)
                holders[0] -= 1

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(overlaps) == 120 and max(overlaps) == 1
    assert list(tmp_path.iterdir()) == []

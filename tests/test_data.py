"""Data preparation (text -> shards) and loading (shards -> windows -> batches)."""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from gptlab.data import TokenDataset, iterate_batches, num_batches, prepare, read_meta, resolve_data, window_offset
from gptlab.errors import GptlabError
from gptlab.tokenizers.base import SPECIAL_TOKENS, Tokenizer


class ByteTokenizer(Tokenizer):
    """id = UTF-8 byte value; the four special tokens follow at 256..259."""

    kind = "test-bytes"

    def __init__(self, tag: str = "", vocab_size: int = 260):
        self.tag = tag  # changes the fingerprint without changing the ids
        self._vocab_size = vocab_size
        self.encode_calls = 0

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def special_tokens(self) -> dict[str, int]:
        return {token: 256 + i for i, token in enumerate(SPECIAL_TOKENS)}

    def encode(self, text, allowed_special=()):
        self.encode_calls += 1
        return list(text.encode("utf-8"))

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def to_files(self):
        return {"tag": self.tag.encode(), "vocab_size": str(self._vocab_size).encode()}

    @classmethod
    def from_files(cls, files):
        return cls(files["tag"].decode(), int(files["vocab_size"]))


class FailingTokenizer(ByteTokenizer):
    """Fails on its second document, after the first has been written."""

    def encode(self, text, allowed_special=()):
        if self.encode_calls >= 1:
            raise RuntimeError("tokenizer crashed")
        return super().encode(text, allowed_special)


EOS = 259


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def all_tokens(prepared_dir: Path) -> np.ndarray:
    meta = read_meta(prepared_dir)
    return np.concatenate([np.fromfile(prepared_dir / name, dtype=meta["dtype"]) for name in meta["shards"]])


# ---- prepare ----------------------------------------------------------------------------
def test_prepare_writes_documents_with_eos_and_meta(tmp_path):
    corpus = tmp_path / "corpus"
    write(corpus / "b.txt", "héllo")
    write(corpus / "a.txt", "ab")
    write(corpus / "sub" / "c.txt", "xyz")
    write(corpus / "notes.md", "not text data")
    out = prepare([corpus], ByteTokenizer(), tmp_path / "prepared", progress=False)

    expected = [97, 98, EOS, *"héllo".encode(), EOS, *b"xyz", EOS]  # sorted: a.txt, b.txt, sub/c.txt
    assert all_tokens(out).tolist() == expected
    meta = json.loads((out / "meta.json").read_text())
    assert meta["format"] == "gptlab-tokens" and meta["version"] == 1
    assert meta["tokenizer_kind"] == "test-bytes"
    assert meta["tokenizer_fingerprint"] == ByteTokenizer().fingerprint()
    assert meta["vocab_size"] == 260 and meta["dtype"] == "uint16"
    assert meta["num_tokens"] == len(expected)
    assert meta["num_bytes"] == 2 + len("héllo".encode()) + 3
    assert [Path(s["path"]).name for s in meta["sources"]] == ["a.txt", "b.txt", "c.txt"]
    assert [s["tokens"] for s in meta["sources"]] == [3, 7, 4]
    assert meta["shards"] == ["tokens_00000.bin"]
    assert (out / "tokens_00000.bin").stat().st_size == 2 * len(expected)


def test_large_vocabulary_uses_uint32(tmp_path):
    source = write(tmp_path / "a.txt", "abc")
    out = prepare([source], ByteTokenizer(vocab_size=70000), tmp_path / "prepared", progress=False)
    assert read_meta(out)["dtype"] == "uint32"
    assert (out / "tokens_00000.bin").stat().st_size == 4 * 4
    assert all_tokens(out).tolist() == [97, 98, 99, EOS]


def test_shards_split_the_stream_without_changing_it(tmp_path):
    sources = [write(tmp_path / f"{i}.txt", "abcdefg"[: i + 1]) for i in range(5)]
    whole = prepare(sources, ByteTokenizer(), tmp_path / "whole", progress=False)
    sharded = prepare(sources, ByteTokenizer(), tmp_path / "sharded", progress=False, shard_tokens=4)
    meta = read_meta(sharded)
    assert len(meta["shards"]) == 5 and meta["shard_lengths"] == [4, 4, 4, 4, 4]
    assert all_tokens(sharded).tolist() == all_tokens(whole).tolist()


def test_invalid_utf8_is_replaced_with_a_warning(tmp_path):
    source = tmp_path / "latin1.txt"
    source.write_bytes("a long enough line, one café".encode("latin-1"))
    with pytest.warns(UserWarning, match="latin1.txt"):
        out = prepare([source], ByteTokenizer(), tmp_path / "prepared", progress=False)
    assert all_tokens(out).tolist() == [*"a long enough line, one caf\ufffd".encode(), EOS]
    assert read_meta(out)["num_bytes"] == len("a long enough line, one caf\ufffd".encode())


def test_failed_prepare_leaves_nothing_behind(tmp_path):
    sources = [write(tmp_path / "a.txt", "first"), write(tmp_path / "b.txt", "second")]
    out = tmp_path / "prepared"
    with pytest.raises(RuntimeError, match="crashed"):
        prepare(sources, FailingTokenizer(), out, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt"]


def test_failed_prepare_keeps_the_previous_output(tmp_path):
    sources = [write(tmp_path / "a.txt", "first"), write(tmp_path / "b.txt", "second")]
    out = prepare(sources, ByteTokenizer(), tmp_path / "prepared", progress=False)
    before = all_tokens(out).tolist()
    with pytest.raises(RuntimeError):
        prepare(sources, FailingTokenizer(), out, progress=False)
    assert all_tokens(out).tolist() == before


def test_prepare_refuses_to_replace_a_directory_of_other_files(tmp_path):
    source = write(tmp_path / "a.txt", "abc")
    write(tmp_path / "mine" / "keep.me", "precious")
    with pytest.raises(GptlabError, match="not prepared data"):
        prepare([source], ByteTokenizer(), tmp_path / "mine", progress=False)
    assert (tmp_path / "mine" / "keep.me").read_text() == "precious"


@pytest.mark.parametrize(
    "extra", [{"notes.md": "precious"}, {}], ids=["our-data-plus-a-file", "a-meta-json-of-another-kind"]
)
def test_prepare_replaces_only_a_directory_of_its_own_files(tmp_path, extra):
    source = write(tmp_path / "a.txt", "abc")
    out = prepare([source], ByteTokenizer(), tmp_path / "prepared", progress=False)
    if extra:
        for name, text in extra.items():
            write(out / name, text)
    else:
        (out / "meta.json").write_text('{"name": "my project"}')
    with pytest.raises(GptlabError, match="not prepared data"):
        prepare([source], ByteTokenizer(), out, progress=False)
    assert (out / "meta.json").is_file() and all((out / name).read_text() == text for name, text in extra.items())
    if extra:  # without the stranger, our own earlier output is replaced as before
        (out / "notes.md").unlink()
        prepare([source], ByteTokenizer(), out, progress=False)


@pytest.mark.parametrize("make", [lambda d: write(d / "empty.txt", ""), lambda d: write(d / "x.md", "abc").parent])
def test_empty_data_is_an_error(tmp_path, make):
    (tmp_path / "src").mkdir()
    source = make(tmp_path / "src")
    with pytest.raises(GptlabError, match="no text"):
        prepare([source], ByteTokenizer(), tmp_path / "prepared", progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["src"]  # neither out_dir nor its temp dir


def test_missing_path_is_an_error(tmp_path):
    with pytest.raises(GptlabError, match="nope.txt"):
        prepare([tmp_path / "nope.txt"], ByteTokenizer(), tmp_path / "prepared", progress=False)
    with pytest.raises(GptlabError, match="nope.txt"):
        resolve_data(tmp_path / "nope.txt", ByteTokenizer(), progress=False)


# ---- windows ----------------------------------------------------------------------------
def prepared_range(tmp_path: Path, text: str, **kwargs) -> Path:
    return prepare([write(tmp_path / "t.txt", text)], ByteTokenizer(), tmp_path / "prepared", progress=False, **kwargs)


def test_windows_are_shifted_pairs_of_exact_tokens(tmp_path):
    text = "abcdefghijklmnopq"  # 17 tokens + EOS = 18
    ds = TokenDataset(prepared_range(tmp_path, text), seq_len=4)
    tokens = [*text.encode(), EOS]
    assert len(ds) == (18 - 1) // 4 == 4
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (4,)
        assert x.tolist() == tokens[4 * i : 4 * i + 4]
        assert y.tolist() == tokens[4 * i + 1 : 4 * i + 5]
    assert ds[-1][0].tolist() == ds[3][0].tolist()
    with pytest.raises(IndexError):
        ds[4]
    assert ds.num_tokens == 18 and ds.meta["num_tokens"] == 18
    assert len(TokenDataset(ds.prepared_dir, seq_len=6)) == 2  # a third window would need token 18
    assert ds.bytes_per_token == pytest.approx(17 / 18)


@pytest.mark.parametrize("offset", [0, 1, 3])
def test_shifted_windows_start_at_the_offset_and_the_last_ends_at_the_last_token(tmp_path, offset):
    text = "abcdefghijklmnopq"  # 17 tokens + EOS = 18: windows of 4 leave one token spare
    ds = TokenDataset(prepared_range(tmp_path, text, shard_tokens=5), seq_len=4)
    tokens = [*text.encode(), EOS]
    shifted = ds.shifted(offset)
    assert len(shifted) == len(ds) == 4 and ds.offset == 0  # the original is unchanged
    for i in range(len(shifted)):
        start = min(4 * i + offset, 18 - 5)  # window 3 would need tokens past the end: it ends at the last
        x, y = shifted[i]
        assert x.tolist() == tokens[start : start + 4] and y.tolist() == tokens[start + 1 : start + 5]
    with pytest.raises(GptlabError, match=r"0\.\.3, got 4"):
        ds.shifted(4)


def test_window_offsets_depend_only_on_seed_and_epoch():
    assert window_offset(seed=5, epoch=1, seq_len=256) == 0  # the first epoch keeps the plain windows
    offsets = [window_offset(seed=5, epoch=epoch, seq_len=256) for epoch in range(2, 12)]
    assert offsets == [window_offset(seed=5, epoch=epoch, seq_len=256) for epoch in range(2, 12)]
    assert all(0 <= offset < 256 for offset in offsets) and len(set(offsets)) > 5
    assert offsets != [window_offset(seed=6, epoch=epoch, seq_len=256) for epoch in range(2, 12)]


@pytest.mark.parametrize("shard_tokens", [1, 3, 5, 7, 100])
def test_windows_span_shard_boundaries(tmp_path, shard_tokens):
    text = "the quick brown fox jumps over the lazy dog"
    ds = TokenDataset(prepared_range(tmp_path, text, shard_tokens=shard_tokens), seq_len=6)
    tokens = torch.tensor([*text.encode(), EOS])
    x, y = ds.batch(np.arange(len(ds)))
    starts = torch.arange(len(ds))[:, None] * 6 + torch.arange(6)  # (B, T)
    assert torch.equal(x, tokens[starts]) and torch.equal(y, tokens[starts + 1])


def test_data_shorter_than_one_window_is_an_error(tmp_path):
    prepared = prepared_range(tmp_path, "abcd")  # 5 tokens
    assert len(TokenDataset(prepared, seq_len=4)) == 1
    with pytest.raises(GptlabError, match=r"5 tokens.*seq_len 5"):
        TokenDataset(prepared, seq_len=5)


def test_truncated_or_missing_shard_is_an_error(tmp_path):
    prepared = prepared_range(tmp_path, "abcdefgh", shard_tokens=4)
    shard = prepared / "tokens_00001.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(GptlabError, match="truncated"):
        TokenDataset(prepared, seq_len=2)
    shard.unlink()
    with pytest.raises(GptlabError, match="missing"):
        TokenDataset(prepared, seq_len=2)


@pytest.mark.parametrize("damage", ["delete", "garbage", "wrong-format", "no-count"])
def test_missing_or_corrupt_meta_is_an_error(tmp_path, damage):
    prepared = prepared_range(tmp_path, "abcdefgh")
    meta_path = prepared / "meta.json"
    meta = json.loads(meta_path.read_text())
    if damage == "delete":
        meta_path.unlink()
    elif damage == "garbage":
        meta_path.write_text("{not json")
    elif damage == "wrong-format":
        meta_path.write_text(json.dumps({**meta, "format": "other"}))
    else:
        meta_path.write_text(json.dumps({k: v for k, v in meta.items() if k != "num_tokens"}))
    with pytest.raises(GptlabError, match="meta.json"):
        TokenDataset(prepared, seq_len=2)
    with pytest.raises(GptlabError, match="meta.json"):
        resolve_data(prepared, ByteTokenizer(), progress=False)


# ---- batches ----------------------------------------------------------------------------
@pytest.fixture
def dataset(tmp_path) -> TokenDataset:
    text = "".join(chr(ord("A") + i // 10) for i in range(10 * 23))  # "AAAAAAAAAABBBB...": 23 windows of 10
    return TokenDataset(prepared_range(tmp_path, text, shard_tokens=64), seq_len=10)


def window_ids(dataset: TokenDataset, x: torch.Tensor) -> list[int]:
    """Which window each row of x is (every window of `dataset` differs)."""
    lookup = {tuple(dataset[i][0].tolist()): i for i in range(len(dataset))}
    return [lookup[tuple(row.tolist())] for row in x]


@pytest.mark.parametrize("shuffle", [False, True])
def test_an_epoch_covers_every_window_once(dataset, shuffle):
    batches = list(iterate_batches(dataset, batch_size=5, shuffle=shuffle, seed=0, epoch=0))
    assert len(batches) == num_batches(dataset, 5) == 5
    assert [len(x) for x, _ in batches] == [5, 5, 5, 5, 3]
    seen = [i for x, _ in batches for i in window_ids(dataset, x)]
    assert sorted(seen) == list(range(23))
    assert (seen == list(range(23))) != shuffle
    for x, y in batches:
        assert x.dtype == y.dtype == torch.int64 and x.shape[1] == y.shape[1] == 10
        assert torch.equal(x[:, 1:], y[:, :-1])


def order(dataset, seed, epoch, start_batch=0):
    batches = iterate_batches(dataset, 4, shuffle=True, seed=seed, epoch=epoch, start_batch=start_batch)
    return [i for x, _ in batches for i in window_ids(dataset, x)]


def test_shuffle_depends_only_on_seed_and_epoch(dataset):
    assert order(dataset, seed=7, epoch=3) == order(dataset, seed=7, epoch=3)
    assert order(dataset, seed=7, epoch=3) != order(dataset, seed=7, epoch=4)
    assert order(dataset, seed=7, epoch=3) != order(dataset, seed=8, epoch=3)


def test_resuming_at_start_batch_gives_the_tail_of_the_epoch(dataset):
    full = list(iterate_batches(dataset, 4, shuffle=True, seed=1, epoch=2))
    resumed = list(iterate_batches(dataset, 4, shuffle=True, seed=1, epoch=2, start_batch=3))
    assert len(resumed) == len(full) - 3
    for (x, y), (rx, ry) in zip(full[3:], resumed):
        assert torch.equal(x, rx) and torch.equal(y, ry)
    assert list(iterate_batches(dataset, 4, shuffle=True, seed=1, epoch=2, start_batch=len(full))) == []


# ---- resolve_data -----------------------------------------------------------------------
def test_resolve_data_caches_next_to_the_text_and_reuses_it(tmp_path):
    source = write(tmp_path / "train.txt", "hello world")
    tokenizer = ByteTokenizer()
    first = resolve_data(source, tokenizer, progress=False)
    assert first == tmp_path.resolve() / f"train.txt.gptlab-{tokenizer.fingerprint()}"
    assert tokenizer.encode_calls == 1
    assert resolve_data(source, tokenizer, progress=False) == first
    assert tokenizer.encode_calls == 1  # reused, not re-tokenized
    assert TokenDataset(first, seq_len=4).num_tokens == 12


def test_resolve_data_reprepares_when_the_source_changes(tmp_path):
    source = write(tmp_path / "train.txt", "hello world")
    tokenizer = ByteTokenizer()
    cache = resolve_data(source, tokenizer, progress=False)
    write(source, "goodbye world")
    stat = source.stat()
    os.utime(source, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert resolve_data(source, tokenizer, progress=False) == cache
    assert tokenizer.encode_calls == 2
    assert all_tokens(cache).tolist() == [*b"goodbye world", EOS]


def test_resolve_data_notices_a_new_file_in_a_directory(tmp_path, monkeypatch):
    corpus = tmp_path / "corpus"
    write(corpus / "a.txt", "aa")
    tokenizer = ByteTokenizer()
    cache = resolve_data(corpus, tokenizer, progress=False)
    assert cache.parent == tmp_path.resolve() and cache.name.startswith("corpus.gptlab-")
    write(corpus / "b.txt", "bb")
    monkeypatch.chdir(corpus)
    assert resolve_data(".", tokenizer, progress=False) == cache
    assert all_tokens(cache).tolist() == [97, 97, EOS, 98, 98, EOS]


def test_resolve_data_accepts_prepared_data_from_the_same_tokenizer_only(tmp_path):
    prepared = prepared_range(tmp_path, "abcdefgh")
    assert resolve_data(prepared, ByteTokenizer(), progress=False) == prepared
    with pytest.raises(GptlabError, match="prepared with another tokenizer"):
        resolve_data(prepared, ByteTokenizer(tag="other"), progress=False)


def test_resolve_data_falls_back_to_the_user_cache(tmp_path, monkeypatch):
    # importlib: the package attribute `gptlab.data.prepare` is the function, not the module.
    prepare_module = importlib.import_module("gptlab.data.prepare")
    source = write(tmp_path / "data" / "train.txt", "hello")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    real_is_writable = prepare_module._is_writable
    monkeypatch.setattr(prepare_module, "_is_writable", lambda d: d != source.parent.resolve() and real_is_writable(d))
    tokenizer = ByteTokenizer()
    cache = resolve_data(source, tokenizer, progress=False)
    assert cache.is_relative_to((tmp_path / "cache" / "gptlab").resolve())
    assert sorted(p.name for p in source.parent.iterdir()) == ["train.txt"]
    assert all_tokens(cache).tolist() == [*b"hello", EOS]
    assert resolve_data(source, tokenizer, progress=False) == cache and tokenizer.encode_calls == 1

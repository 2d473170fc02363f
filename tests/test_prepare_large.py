"""Large corpora: text read in pieces, worker processes, JSONL documents, concurrent caches."""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gptlab.data import TokenDataset, prepare, read_meta, resolve_data
from gptlab.data.sources import can_split, safe_cut, text_file_segments
from gptlab.errors import GptlabError
from gptlab.tokenizers import load_tokenizer
from gptlab.tokenizers.base import SPECIAL_TOKENS, Tokenizer
from gptlab.tokenizers.bpe import GPT2_PATTERN, BPETokenizer
from gptlab.tokenizers.char import CharTokenizer
from gptlab.tokenizers.corpus import read_text_file
from gptlab.tokenizers.tiktoken_adapter import KNOWN_ENCODINGS

from data_files import SHAKESPEARE_TRAIN, cl100k_file

ROOT = Path(__file__).resolve().parents[1]
TOY_TOKENIZER = ROOT / "toy_data" / "tiny_sp"
TOY_TEXT = ROOT / "toy_data" / "tiny_sp_train.txt"
# Everything that sits around a line break in real text: runs of \n and \r\n, trailing and
# leading spaces and tabs, Unicode spaces, punctuation, digits, contractions, non-ASCII letters.
TRICKY = st.lists(
    st.sampled_from(
        [
            "\n",
            "\n\n",
            "\r\n",
            " ",
            "  ",
            "\t",
            "\u3000",
            "\xa0",
            "a",
            "Zz",
            "7",
            "42",
            ".",
            "!?",
            "/",
            "'s",
            "é",
            "日本",
            "😀",
            "x\n",
            "\ny",
        ]
    ),
    max_size=200,
).map("".join)


@pytest.fixture(scope="module")
def toy() -> Tokenizer:
    return load_tokenizer(None, TOY_TOKENIZER)


def all_tokens(prepared_dir: Path) -> list[int]:
    meta = read_meta(prepared_dir)
    return np.concatenate([np.fromfile(prepared_dir / name, dtype=meta["dtype"]) for name in meta["shards"]]).tolist()


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8", newline="")
    return path


# ---- cutting text at safe points --------------------------------------------------------
@pytest.mark.parametrize(
    "data, cut",
    [
        (b"ab\ncd", 3),
        (b"ab\n\n\ncd\n", 5),
        (b"ab\n cd", 0),
        (b"ab\n\tcd\ne", 7),
        (b"a\n\xe3\x80\x80b", 0),
        (b"a\n\xe6\x97\xa5", 2),
        (b"a\n\xe6\x97", 0),
        (b"no newline", 0),
        (b"ends\n", 0),
    ],
)
def test_safe_cut_is_after_the_last_newline_before_a_visible_character(data, cut):
    assert safe_cut(data) == cut


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=TRICKY, piece_bytes=st.integers(1, 40))
def test_pieces_encode_exactly_like_the_whole_text(tmp_path, toy, text, piece_bytes):
    path = write(tmp_path / "t.txt", text)
    segments = list(text_file_segments(path, 0, piece_bytes))
    assert "".join(s.text for s in segments) == text
    assert sum(s.file_bytes for s in segments) == sum(s.text_bytes for s in segments) == len(text.encode())
    pieces = [toy.encode(s.text) for s in segments]
    assert [i for piece in pieces for i in piece] == toy.encode(text)
    assert [s.ends_document for s in segments] == [False] * (len(segments) - 1) + [bool(text)]


def test_big_text_is_read_in_bounded_pieces(tmp_path, toy):
    text = TOY_TEXT.read_text(encoding="utf-8")[:200_000]
    segments = list(text_file_segments(write(tmp_path / "t.txt", text), 0, piece_bytes=4096))
    assert len(segments) > 40 and max(s.text_bytes for s in segments) <= 2 * 4096
    assert "".join(s.text for s in segments) == text
    assert [i for s in segments for i in toy.encode(s.text)] == toy.encode(text)
    assert len(list(text_file_segments(tmp_path / "t.txt", 0, piece_bytes=4096, split=False))) == 1


@pytest.mark.filterwarnings("ignore:.*not valid UTF-8")  # expected here; their text is checked below
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.lists(
        st.sampled_from([b"abc", b"\n", b"\n\n", b" ", b"\xff", b"\xe6\x97\xa5", b"\xe6", b"z\n"]), max_size=120
    ),
    piece_bytes=st.integers(1, 16),
)
def test_piecewise_decoding_follows_the_whole_file_rules(tmp_path, data, piece_bytes):
    path = tmp_path / "t.txt"
    path.write_bytes(b"\xef\xbb\xbf" + b"".join(data))
    try:
        whole, whole_error = read_text_file(path), None
    except GptlabError as error:
        whole, whole_error = None, error
    try:
        texts = [s.text for s in text_file_segments(path, 0, piece_bytes)]
    except GptlabError as error:
        assert whole_error is not None and "not UTF-8" in str(error) and "not UTF-8" in str(whole_error)
        return
    assert whole_error is None and "".join(texts) == whole


def test_bad_bytes_far_into_a_file_are_reported_at_their_offset(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(b"line\n" * 1000 + b"caf\xe9\n" + b"line\n" * 1000)
    with pytest.warns(UserWarning, match=r"t\.txt is not valid UTF-8 \(first bad byte at offset 5003\); 1 undecodable"):
        texts = [s.text for s in text_file_segments(path, 0, piece_bytes=64)]
    assert "".join(texts) == "line\n" * 1000 + "caf\ufffd\n" + "line\n" * 1000
    path.write_bytes(b"line\n" * 1000 + b"\0")
    with pytest.raises(GptlabError, match="binary"):
        list(text_file_segments(path, 0, piece_bytes=64))


# ---- tokenizers that must not be split ---------------------------------------------------
O200K_PATTERN = KNOWN_ENCODINGS["o200k_base"][0]


@pytest.mark.parametrize(
    "pattern, merges, text",
    [
        (GPT2_PATTERN, [(10, 10)], "x\n\ny"),  # GPT-2: "\n\n" before a letter is two chunks, at the end one
        (O200K_PATTERN, [(46, 10), (256, 47)], ".\n/x"),  # o200k: punctuation takes newlines *and* slashes
    ],
)
def test_patterns_that_join_across_newlines_get_whole_documents(tmp_path, pattern, merges, text):
    tokenizer = BPETokenizer(merges, pattern)
    cut = text.index("\n") + text.count("\n")
    # Cutting after the newlines would change the ids, so these tokenizers must get whole documents.
    assert tokenizer.encode(text[:cut]) + tokenizer.encode(text[cut:]) != tokenizer.encode(text)
    assert not can_split(tokenizer)
    source = write(tmp_path / "t.txt", (text + "\n") * 50)
    out = prepare([source], tokenizer, tmp_path / "out", progress=False, piece_bytes=8, workers=1)
    assert all_tokens(out) == tokenizer.encode((text + "\n") * 50) + [tokenizer.eos_id]


def test_char_and_gpt4_tokenizers_are_split(toy):
    assert can_split(toy) and can_split(CharTokenizer.train(["ab\n"]))
    assert not can_split(BPETokenizer(toy.merges, "gpt2"))


# ---- worker processes -------------------------------------------------------------------
def make_corpus(root: Path) -> Path:
    text = TOY_TEXT.read_text(encoding="utf-8")
    write(root / "big.txt", text[:120_000])
    for i in range(6):
        write(root / "small" / f"{i}.txt", text[150_000 + 997 * i : 150_000 + 997 * i + 50 * i])  # the first is empty
    return root


def test_output_is_identical_whatever_the_worker_count(tmp_path, toy):
    corpus = make_corpus(tmp_path / "corpus")
    outputs = [
        prepare([corpus], toy, tmp_path / f"w{n}", progress=False, shard_tokens=5000, workers=n, piece_bytes=8192)
        for n in (1, 2, 3)
    ]
    reference = outputs[0]
    meta = read_meta(reference)
    assert len(meta["shards"]) > 3
    for out in outputs[1:]:
        assert read_meta(out) == meta
        assert all((out / name).read_bytes() == (reference / name).read_bytes() for name in meta["shards"])
    files = [corpus / "big.txt", *sorted((corpus / "small").glob("*.txt"))]
    expected = []
    for path in files:
        text = path.read_text(encoding="utf-8")
        expected += toy.encode(text) + [toy.eos_id] if text else []
    assert all_tokens(reference) == expected
    expected_counts = [len(toy.encode(p.read_text())) + bool(p.stat().st_size) for p in files]  # + <EOS> if any text
    assert [s["tokens"] for s in meta["sources"]] == expected_counts
    assert [s["documents"] for s in meta["sources"]] == [1, 0, 1, 1, 1, 1, 1]
    assert meta["num_bytes"] == sum(p.stat().st_size for p in files)


class BadIdTokenizer(Tokenizer):
    """Encodes each character as its code point: out of range for anything past 'z'."""

    kind = "test-bad-ids"
    vocab_size = 128
    special_tokens = {token: 124 + i for i, token in enumerate(SPECIAL_TOKENS)}

    def encode(self, text, allowed_special=()):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(map(chr, ids))

    def to_files(self):
        return {}

    @classmethod
    def from_files(cls, files):
        return cls()


def test_an_error_in_a_worker_stops_prepare_and_leaves_nothing(tmp_path):
    source = write(tmp_path / "src" / "t.txt", "fine line\n" * 2000 + "then \u00e9\n" + "fine line\n" * 2000)
    with pytest.raises(GptlabError, match="id 233 outside its vocabulary"):
        prepare([source], BadIdTokenizer(), tmp_path / "out", progress=False, workers=2, piece_bytes=1024)
    assert [p.name for p in tmp_path.iterdir()] == ["src"]


@pytest.mark.parametrize(
    "option, message",
    [
        ({"workers": 0}, "workers must be at least 1"),
        ({"shard_tokens": 0}, "shard_tokens must be positive"),
        ({"jsonl_field": ""}, "jsonl_field is empty"),
    ],
)
def test_bad_options_are_clear_errors(tmp_path, toy, option, message):
    with pytest.raises(GptlabError, match=message):
        prepare([write(tmp_path / "t.txt", "abc")], toy, tmp_path / "out", progress=False, **option)


# ---- JSONL ------------------------------------------------------------------------------
def test_jsonl_lines_are_documents(tmp_path, toy):
    corpus = tmp_path / "corpus"
    write(corpus / "b.jsonl", json.dumps({"text": "second file", "id": 3}) + "\n")
    records = [{"text": "Hello there.\n"}, {"text": ""}, {"text": "日本 ok"}]
    write(corpus / "a.jsonl", "\n".join(json.dumps(r) for r in records) + "\n\n")
    write(corpus / "ignored.txt", "not jsonl")
    out = prepare([corpus], toy, tmp_path / "out", progress=False, jsonl_field="text")
    documents = ["Hello there.\n", "日本 ok", "second file"]
    assert all_tokens(out) == [i for doc in documents for i in toy.encode(doc) + [toy.eos_id]]
    meta = read_meta(out)
    assert [Path(s["path"]).name for s in meta["sources"]] == ["a.jsonl", "b.jsonl"]
    assert [s["documents"] for s in meta["sources"]] == [2, 1]
    assert meta["num_bytes"] == sum(len(doc.encode()) for doc in documents) and meta["jsonl_field"] == "text"


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"text": "ok"', r"docs\.jsonl:2 is not valid JSON"),
        ('{"body": "x"}', r"docs\.jsonl:2 has no string field 'text'"),
        ('["text"]', r"docs\.jsonl:2 has no string field"),
        ('{"text": 5}', r"docs\.jsonl:2 has no string field"),
    ],
)
def test_bad_jsonl_lines_are_reported_with_file_and_line(tmp_path, toy, line, message):
    source = write(tmp_path / "src" / "docs.jsonl", '{"text": "fine"}\n' + line + "\n")
    with pytest.raises(GptlabError, match=message):
        prepare([source], toy, tmp_path / "out", progress=False, jsonl_field="text")
    assert [p.name for p in tmp_path.iterdir()] == ["src"]


def test_jsonl_without_documents_is_an_error(tmp_path, toy):
    source = write(tmp_path / "docs.jsonl", '{"text": ""}\n\n')
    with pytest.raises(GptlabError, match="no JSONL documents"):
        prepare([source], toy, tmp_path / "out", progress=False, jsonl_field="text")


# ---- resolve_data under concurrent processes ---------------------------------------------
class SlowLoggingTokenizer(BPETokenizer):
    """The toy tokenizer, slowed down, recording in a file each process that encodes."""

    log: Path

    def encode(self, text, allowed_special=()):
        with open(self.log, "a") as log:
            log.write(f"{os.getpid()}\n")
        time.sleep(0.3)  # long enough that both processes are waiting on the cache at once
        return super().encode(text, allowed_special)


def resolve_in_child(source: Path, log: Path, results) -> None:
    tokenizer = SlowLoggingTokenizer(load_tokenizer(None, TOY_TOKENIZER).merges)
    tokenizer.log = log
    results.put(str(resolve_data(source, tokenizer, progress=False)))


def test_concurrent_resolve_data_prepares_once_and_shares_the_result(tmp_path, toy):
    source = write(tmp_path / "train.txt", "To be, or not to be: that is the question.\n" * 20)
    log = tmp_path / "encode.log"
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    children = [context.Process(target=resolve_in_child, args=(source, log, results)) for _ in range(2)]
    for child in children:
        child.start()
    for child in children:
        child.join(timeout=60)
    assert [child.exitcode for child in children] == [0, 0]
    paths = {results.get(timeout=5) for _ in children}
    assert len(paths) == 1 and len(set(log.read_text().split())) == 1  # one process tokenized, the other reused it
    cache = Path(paths.pop())
    assert all_tokens(cache) == toy.encode(source.read_text()) + [toy.eos_id]
    assert TokenDataset(cache, seq_len=8).num_tokens == len(all_tokens(cache))


# ---- a real corpus, end to end (slow) ----------------------------------------------------
@pytest.mark.slow
def test_shakespeare_with_cl100k_in_pieces_and_workers_matches_whole_encoding(tmp_path):
    train = SHAKESPEARE_TRAIN
    tokenizer = load_tokenizer("tiktoken", cl100k_file())
    out = prepare(
        [train], tokenizer, tmp_path / "out", progress=False, workers=2, piece_bytes=64 * 1024, shard_tokens=300_000
    )
    assert all_tokens(out) == tokenizer.encode(read_text_file(train)) + [tokenizer.eos_id]
    assert len(read_meta(out)["shards"]) > 1

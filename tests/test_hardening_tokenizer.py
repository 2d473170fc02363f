"""Split patterns that can backtrack exponentially are refused wherever a pattern comes from
(a tokenizer file, a checkpoint, --pattern), and a panic of tiktoken's engine is one error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import tiktoken

from gptlab.cli import main
from gptlab.errors import GptlabError
from gptlab.tokenizers import BPETokenizer, TiktokenTokenizer, TokenizerEngineError, load_tokenizer
from gptlab.tokenizers.bpe import GPT2_PATTERN, GPT4_PATTERN
from gptlab.tokenizers.pattern_safety import unsafe_construct
from gptlab.tokenizers.tiktoken_adapter import KNOWN_ENCODINGS

ROOT = Path(__file__).resolve().parents[1]
EXPLOSIVE = r"(?:a|aa)+(?=b)|[\s\S]"  # "a" * 40 + "c": exponential in `regex`, a panic in tiktoken
BYTE_RANKS = {bytes([b]): b for b in range(256)}


def tokenizer_with_pattern(tmp_path: Path, pattern: str) -> Path:
    directory = tmp_path / "tok"
    shutil.copytree(ROOT / "toy_data" / "tiny_sp", directory)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    (directory / "tokenizer_config.json").write_text(json.dumps(config | {"pattern": pattern}))
    return directory


@pytest.mark.parametrize("pattern", [EXPLOSIVE, r"(\w)\1|[\s\S]", r"(?:\p{L}+'?)*\s|[\s\S]", r"(?P<x>a)(?P=x)|[\s\S]"])
def test_a_tokenizer_file_with_an_explosive_pattern_is_refused(tmp_path: Path, pattern: str, capsys) -> None:
    directory = tokenizer_with_pattern(tmp_path, pattern)
    with pytest.raises(GptlabError, match="can make splitting take exponential time"):
        load_tokenizer(None, directory)
    assert main(["tokenizer", "encode", "a" * 40 + "c", "--tokenizer", str(directory)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: split pattern") and err.count("\n") == 1


def test_an_explosive_pattern_given_with_pattern_flag_is_refused(tmp_path: Path, capsys) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("aaa bbb aaa\n" * 20)
    args = [
        "tokenizer",
        "train",
        str(corpus),
        "--vocab_size",
        "270",
        "--pattern",
        EXPLOSIVE,
        "--out",
        str(tmp_path / "t"),
    ]
    assert main(args) == 1
    assert "the unbounded quantifier '+' over a group" in capsys.readouterr().err
    assert not (tmp_path / "t").exists()


def test_an_explosive_pattern_in_a_tiktoken_tokenizer_file_is_refused() -> None:
    files = TiktokenTokenizer("bytes", BYTE_RANKS, GPT2_PATTERN, {}).to_files()
    config = json.loads(files["tiktoken_config.json"])
    files["tiktoken_config.json"] = json.dumps(config | {"pattern": EXPLOSIVE}).encode()
    with pytest.raises(GptlabError, match="can make splitting take exponential time"):
        TiktokenTokenizer.from_files(files)


def test_the_shipped_patterns_pass() -> None:
    for pattern in [GPT2_PATTERN, GPT4_PATTERN, *(pattern for pattern, _ in KNOWN_ENCODINGS.values())]:
        assert unsafe_construct(pattern) is None, pattern
    # Possessive and atomic forms of a refused group are the way out the error names.
    assert unsafe_construct(r"(?:a|aa)++(?=b)|[\s\S]") is None
    assert unsafe_construct(r"(?>a|aa)+(?=b)|[\s\S]") is None
    assert unsafe_construct(r"(?:a|b){3}|[(+]+|\p{L}{2,}") is None


def test_a_panic_of_tiktokens_engine_is_one_error(monkeypatch, capsys) -> None:
    # An engine built with the refused pattern, as a tokenizer written before the check would have.
    engine = tiktoken.Encoding("explosive", pat_str=EXPLOSIVE, mergeable_ranks=BYTE_RANKS, special_tokens={})
    tokenizer = BPETokenizer([], "gpt4")
    tokenizer._engine = engine
    with pytest.raises(TokenizerEngineError, match="engine failed on this text .*BacktrackLimitExceeded"):
        tokenizer.encode("a" * 40 + "c")
    monkeypatch.setattr(BPETokenizer, "_tiktoken", lambda self: engine)
    assert main(["tokenizer", "encode", "a" * 40 + "c", "--tokenizer", str(ROOT / "toy_data" / "tiny_sp")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: the default tokenizer's engine failed") and err.count("\n") == 1

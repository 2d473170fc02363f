"""The BPE tokenizer's files: save/load, validation, Hugging Face and tiktoken interop."""

from __future__ import annotations

import json

import pytest
import tiktoken
import tiktoken.load

from gptlab.errors import GptlabError
from gptlab.tokenizers.bpe import GPT4_PATTERN, BPETokenizer

from data_files import SHAKESPEARE_TRAIN, SHAKESPEARE_VAL, cl100k_file, read_text

MIXED = "naïve café e\u0301 日本語の文章 😀👍🏽 1234567 don't WE'LL\t\r\n  x\n\n" * 20
SAMPLE = "To be, or not to be: that is the question. 日本語 😀 e\u0301 <EOS> 12345\n\n  end"


@pytest.fixture(scope="module", params=["gpt4", "gpt2"])
def tokenizer(request) -> BPETokenizer:
    return BPETokenizer.train(
        [read_text(SHAKESPEARE_TRAIN, 100_000), MIXED], 800, pattern=request.param, progress=False
    )


def test_save_and_load_round_trip(tokenizer, tmp_path):
    tokenizer.save(tmp_path / "tok")
    assert sorted(p.name for p in (tmp_path / "tok").iterdir()) == ["merges.txt", "tokenizer_config.json", "vocab.json"]
    loaded = BPETokenizer.load(tmp_path / "tok")
    assert loaded.merges == tokenizer.merges and loaded.pattern == tokenizer.pattern
    assert loaded.fingerprint() == tokenizer.fingerprint()
    assert loaded.encode(SAMPLE, "all") == tokenizer.encode(SAMPLE, "all")


def test_files_follow_the_gpt2_byte_level_format(tokenizer):
    files = tokenizer.to_files()
    merges = files["merges.txt"].decode("utf-8").splitlines()
    assert merges[0] == "#version: 0.2" and len(merges) == 1 + tokenizer.n_merges
    vocab = json.loads(files["vocab.json"])
    assert vocab["Ġ"] == ord(" ") and vocab["!"] == ord("!") and vocab["<EOS>"] == tokenizer.eos_id
    assert len(vocab) == tokenizer.vocab_size
    config = json.loads(files["tokenizer_config.json"])
    assert config["kind"] == "default" and config["pattern"] == tokenizer.pattern
    assert config["special_tokens"] == tokenizer.special_tokens


@pytest.mark.parametrize("missing", ["vocab.json", "merges.txt", "tokenizer_config.json"])
def test_missing_file_is_an_error_naming_it(tokenizer, missing):
    files = tokenizer.to_files()
    del files[missing]
    with pytest.raises(GptlabError, match=missing):
        BPETokenizer.from_files(files)


@pytest.mark.parametrize("name", ["vocab.json", "tokenizer_config.json"])
def test_corrupt_json_is_an_error_naming_the_file(tokenizer, name):
    files = tokenizer.to_files()
    files[name] = files[name][: len(files[name]) // 2]
    with pytest.raises(GptlabError, match=name):
        BPETokenizer.from_files(files)


def test_merges_inconsistent_with_vocab_is_an_error(tokenizer):
    lines = tokenizer.to_files()["merges.txt"].decode("utf-8").splitlines()
    swapped = [lines[0], lines[2], lines[1], *lines[3:]]  # ids no longer follow the merge order
    one_short = lines[:-1]  # vocab.json has a token no merge makes
    for bad, blamed in [(swapped, "merges.txt"), (one_short, "vocab.json")]:
        files = tokenizer.to_files() | {"merges.txt": "\n".join(bad).encode("utf-8")}
        with pytest.raises(GptlabError, match=blamed):
            BPETokenizer.from_files(files)


def test_load_of_missing_directory_is_an_error(tmp_path):
    with pytest.raises(GptlabError, match="not found"):
        BPETokenizer.load(tmp_path / "nowhere")


def test_hugging_face_tokenizers_loads_our_files_and_agrees():
    hf = pytest.importorskip("tokenizers")
    ours = BPETokenizer.train([read_text(SHAKESPEARE_TRAIN, 100_000), MIXED], 800, pattern="gpt2", progress=False)
    files = ours.to_files()
    vocab = json.loads(files["vocab.json"])
    merges = [tuple(line.split(" ")) for line in files["merges.txt"].decode("utf-8").splitlines()[1:]]
    theirs = hf.Tokenizer(hf.models.BPE(vocab, merges))
    theirs.pre_tokenizer = hf.pre_tokenizers.ByteLevel(add_prefix_space=False)
    theirs.decoder = hf.decoders.ByteLevel()
    for text in [read_text(SHAKESPEARE_VAL), MIXED, SAMPLE]:
        ids = ours.encode(text)
        assert theirs.encode(text).ids == ids
        assert theirs.decode(ids) == text


def test_tiktoken_file_round_trip(tokenizer, tmp_path):
    tokenizer.save_tiktoken(tmp_path / "ours.tiktoken")
    back = BPETokenizer.from_tiktoken(tmp_path / "ours.tiktoken", pattern=tokenizer.pattern)
    assert back.merges == tokenizer.merges
    ranks = tiktoken.load.load_tiktoken_bpe(str(tmp_path / "ours.tiktoken"))
    assert len(ranks) == tokenizer.vocab_size - 4 and ranks[b" "] == ord(" ")


def test_cl100k_import_encodes_like_tiktoken():
    ranks = tiktoken.load.load_tiktoken_bpe(str(cl100k_file()))
    theirs = tiktoken.Encoding(name="cl100k", pat_str=GPT4_PATTERN, mergeable_ranks=ranks, special_tokens={})
    ours = BPETokenizer.from_tiktoken(cl100k_file(), pattern="gpt4")
    # The import renumbers ids (bytes first), so compare the tokens' bytes.
    token_of_rank = {rank: token for token, rank in ranks.items()}
    for text in [read_text(SHAKESPEARE_VAL, 50_000), MIXED, SAMPLE]:
        expected = [token_of_rank[r] for r in theirs.encode_ordinary(text)]
        ids = ours.encode(text)
        assert [ours.token_bytes(i) for i in ids] == expected
        assert ours.encode_reference(text) == ids


@pytest.mark.parametrize("content", [b"", b"not base64!! 3\n", b"IQ== x\n"])
def test_malformed_tiktoken_file_is_an_error(tmp_path, content):
    path = tmp_path / "bad.tiktoken"
    path.write_bytes(content)
    with pytest.raises(GptlabError, match="bad.tiktoken"):
        BPETokenizer.from_tiktoken(path)


def test_missing_tiktoken_file_is_an_error(tmp_path):
    with pytest.raises(GptlabError, match="not found"):
        BPETokenizer.from_tiktoken(tmp_path / "none.tiktoken")


def test_a_corpus_full_of_special_token_text_still_saves_and_loads(tmp_path):
    """A split pattern that keeps "<EOS>" whole must not learn it as an ordinary token, which
    vocab.json could not hold beside the special one."""
    tokenizer = BPETokenizer.train(["hello <EOS> world <PAD>\n" * 200], 270, pattern=r"\S+|\s+", progress=False)
    assert all(tokenizer.token_bytes(i) not in {b"<EOS>", b"<PAD>"} for i in range(256, 256 + len(tokenizer.merges)))
    tokenizer.save(tmp_path / "tok")
    again = BPETokenizer.load(tmp_path / "tok")
    text = "hello <EOS> world"
    assert again.encode(text) == tokenizer.encode(text) and again.decode(again.encode(text)) == text

"""The tokenizer kinds besides our BPE (char, tiktoken, sentencepiece), load_tokenizer,
tokenizer_from_files, detect_kind, save_tokenizer and corpus reading."""

from __future__ import annotations

import base64
import hashlib
import io
import random
import shutil
import warnings

import pytest
import sentencepiece as spm
import tiktoken
import tiktoken.load
import tiktoken_ext.openai_public

from gptlab.errors import GptlabError
from gptlab.generation.text_stream import TextStream
from gptlab.tokenizers import (
    KINDS,
    SPECIAL_TOKENS,
    BPETokenizer,
    CharTokenizer,
    SentencePieceTokenizer,
    TiktokenTokenizer,
    detect_kind,
    load_tokenizer,
    save_tokenizer,
    tokenizer_from_files,
    train_tokenizer,
)
from gptlab.tokenizers.corpus import read_corpus
from gptlab.tokenizers.tiktoken_adapter import KNOWN_ENCODINGS

from data_files import SHAKESPEARE_VAL, cl100k_file, read_text

CL100K_URL = "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken"

CORPUS = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "All:\nSpeak, speak.\n\nFirst Citizen:\nYou are all resolved rather to die than to famish?\n"
) * 20
SAMPLES = ["Speak, speak.", "  two  spaces\n\n\ttab and newline\n", "", "unicode: é 日本語 😀", "a<EOS>b <PAD>"]


@pytest.fixture(scope="module")
def sentencepiece() -> SentencePieceTokenizer:
    return SentencePieceTokenizer.train([CORPUS, "é 日本語 😀"], vocab_size=320)


@pytest.fixture(scope="module")
def cl100k() -> TiktokenTokenizer:
    return TiktokenTokenizer.from_file(cl100k_file())


# ---- char ------------------------------------------------------------------------------------
def test_char_round_trip_and_unknown_characters():
    tok = CharTokenizer.train([CORPUS])
    assert tok.special_tokens == {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    assert tok.vocab_size == len(SPECIAL_TOKENS) + len(set(CORPUS))
    assert tok.decode(tok.encode(CORPUS)) == CORPUS
    ids = tok.encode("Speak€")
    assert ids[-1] == tok.unk_id and tok.decode(ids) == "Speak<UNK>"


def test_char_special_tokens_are_text_unless_allowed():
    tok = CharTokenizer.train(["<>EOSab"])
    assert tok.encode("a<EOS>") == [tok.encode("a")[0], *tok.encode("<EOS>")]
    assert len(tok.encode("a<EOS>")) == 6
    assert tok.encode("a<EOS>", allowed_special="all") == [tok.encode("a")[0], tok.eos_id]
    assert tok.encode("a<EOS>", allowed_special={"<BOS>"}) == tok.encode("a<EOS>")


def test_char_from_empty_text_is_an_error():
    with pytest.raises(GptlabError, match="empty"):
        CharTokenizer.train(["", ""])


# ---- sentencepiece ----------------------------------------------------------------------------
def test_sentencepiece_uses_our_special_ids(sentencepiece):
    assert sentencepiece.special_tokens == {"<PAD>": 0, "<UNK>": 1, "<BOS>": 2, "<EOS>": 3}
    assert sentencepiece.vocab_size == 320


@pytest.mark.parametrize("text", SAMPLES + ["never seen: Ω ж ☃ \r\n end  "])
def test_sentencepiece_round_trip(sentencepiece, text):
    assert sentencepiece.decode(sentencepiece.encode(text)) == text


def test_sentencepiece_specials_only_when_allowed(sentencepiece):
    plain = sentencepiece.encode("hi <EOS>")
    assert sentencepiece.eos_id not in plain
    allowed = sentencepiece.encode("hi <EOS>", allowed_special="all")
    assert allowed[-1] == sentencepiece.eos_id
    assert sentencepiece.decode(allowed) == "hi <EOS>"


def test_sentencepiece_too_small_corpus_warns_and_shrinks():
    with pytest.warns(UserWarning, match="supports only"):
        tok = SentencePieceTokenizer.train(["abc abd"], vocab_size=5000)
    assert 260 < tok.vocab_size < 5000


def test_sentencepiece_too_small_vocab_is_an_error():
    with pytest.raises(GptlabError, match="too small"):
        SentencePieceTokenizer.train([CORPUS], vocab_size=100)


def test_sentencepiece_model_file_and_directory(sentencepiece, tmp_path):
    (tmp_path / "m.model").write_bytes(sentencepiece.to_files()["sentencepiece.model"])
    for path in (tmp_path / "m.model", tmp_path):
        assert detect_kind(path) == "sentencepiece"
        assert load_tokenizer(None, path).encode(CORPUS) == sentencepiece.encode(CORPUS)


def test_foreign_sentencepiece_without_pad_gets_a_new_id():
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS.splitlines()), model_writer=model, vocab_size=40, minloglevel=2
    )  # sentencepiece's defaults: unk=0, bos=1, eos=2, no pad
    tok = SentencePieceTokenizer(model.getvalue())
    assert tok.special_tokens == {"<PAD>": 40, "<UNK>": 0, "<BOS>": 1, "<EOS>": 2}
    assert tok.vocab_size == 41
    assert tok.decode([tok.pad_id]) == "<PAD>"


# ---- tiktoken ---------------------------------------------------------------------------------
def test_tiktoken_file_matches_tiktokens_own_cl100k(cl100k, tmp_path, monkeypatch):
    # tiktoken's cache holds a download under sha1(url): put the file there so that
    # tiktoken.get_encoding builds the genuine cl100k_base without the network.
    shutil.copy(cl100k_file(), tmp_path / hashlib.sha1(CL100K_URL.encode()).hexdigest())
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    reference = tiktoken.get_encoding("cl100k_base")
    text = read_text(SHAKESPEARE_VAL, 50_000) + " 日本語 😀 <|endoftext|>"
    assert cl100k.encode(text) == reference.encode(text, disallowed_special=())
    assert cl100k.decode(cl100k.encode(text)) == text
    assert load_tokenizer("tiktoken", "cl100k_base").encode(text) == cl100k.encode(text)


def test_tiktoken_specials(cl100k):
    assert cl100k.special_tokens["<PAD>"] == 100277 and cl100k.vocab_size == 100281
    assert cl100k.encode("<|endoftext|>", allowed_special="all") == [100257]
    assert cl100k.encode("x<EOS>", allowed_special={"<EOS>"})[-1] == cl100k.eos_id
    assert len(cl100k.encode("<EOS>")) > 1  # plain text unless allowed
    with pytest.raises(GptlabError, match="not used"):
        cl100k.decode([100265])  # a gap between cl100k's special ids


def test_tiktoken_from_files_is_identical(cl100k):
    rebuilt = tokenizer_from_files("tiktoken", cl100k.to_files())
    assert rebuilt.encode(CORPUS) == cl100k.encode(CORPUS)
    assert rebuilt.special_tokens == cl100k.special_tokens
    assert rebuilt.fingerprint() == cl100k.fingerprint()


def test_offline_named_encoding_is_one_clear_error(tmp_path, monkeypatch):
    def no_network(blobpath):
        raise ConnectionError(f"network disabled in tests: {blobpath}")

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(tiktoken.load, "read_file", no_network)
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})  # forget encodings built by other tests
    with pytest.raises(GptlabError, match="TIKTOKEN_CACHE_DIR") as error:
        load_tokenizer("tiktoken", "o200k_base")
    assert ".tiktoken" in str(error.value) and "\n" not in str(error.value)


def test_unknown_encoding_name_lists_the_known_ones():
    with pytest.raises(GptlabError, match="cl100k_base"):
        TiktokenTokenizer.from_name("nonexistent_base")


@pytest.mark.parametrize("name", sorted(KNOWN_ENCODINGS))
def test_known_encodings_table_agrees_with_tiktoken(name, monkeypatch):
    # Build tiktoken's own definition with the rank download stubbed out; compare the rest.
    monkeypatch.setattr(tiktoken_ext.openai_public, "load_tiktoken_bpe", lambda *a, **k: {})
    monkeypatch.setattr(tiktoken_ext.openai_public, "data_gym_to_mergeable_bpe_ranks", lambda *a, **k: {})
    definition = tiktoken_ext.openai_public.ENCODING_CONSTRUCTORS[name]()
    assert KNOWN_ENCODINGS[name] == (definition["pat_str"], definition["special_tokens"])


def test_tiktoken_with_unknown_file_name_uses_gpt4_pattern(tmp_path):
    ranks = "".join(f"{base64.b64encode(bytes([b])).decode()} {b}\n" for b in range(256))
    (tmp_path / "mine.tiktoken").write_text(ranks)
    tok = load_tokenizer(None, tmp_path / "mine.tiktoken")
    assert tok.special_tokens == {"<PAD>": 256, "<UNK>": 257, "<BOS>": 258, "<EOS>": 259}
    assert tok.encode("hi") == [ord("h"), ord("i")]
    with pytest.raises(GptlabError, match="valid regex"):
        TiktokenTokenizer.from_file(tmp_path / "mine.tiktoken", pattern="(unclosed")


# ---- every kind ----------------------------------------------------------------------------------
def _trained(kind: str):
    if kind == "tiktoken":
        return TiktokenTokenizer.from_file(cl100k_file())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the toy corpus is too small for 300 ids; that is fine here
        # The samples are in the corpus so that the char kind knows all their characters.
        return train_tokenizer(kind, [CORPUS, *SAMPLES], 300, progress=False)


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_saves_loads_and_rebuilds_identically(kind, tmp_path):
    tok = _trained(kind)
    assert tok.kind == kind
    save_tokenizer(tok, tmp_path / "tok")
    assert detect_kind(tmp_path / "tok") == kind
    for rebuilt in (load_tokenizer(kind, tmp_path / "tok"), tokenizer_from_files(kind, tok.to_files())):
        assert type(rebuilt) is type(tok)
        assert rebuilt.fingerprint() == tok.fingerprint()
        for text in SAMPLES:
            assert rebuilt.encode(text, allowed_special="all") == tok.encode(text, allowed_special="all")
            assert rebuilt.decode(rebuilt.encode(text)) == text
        assert rebuilt.decode([rebuilt.eos_id]) == "<EOS>"


def test_unknown_kind_lists_the_kinds(tmp_path):
    for call in (lambda: load_tokenizer("wordpiece", tmp_path), lambda: tokenizer_from_files("wordpiece", {})):
        with pytest.raises(GptlabError, match="default, tiktoken, sentencepiece, char"):
            call()


def test_detect_kind(tmp_path):
    assert detect_kind("cl100k_base") == "tiktoken"
    with pytest.raises(GptlabError, match="not found"):
        detect_kind(tmp_path / "missing")
    with pytest.raises(GptlabError, match="no tokenizer files"):
        detect_kind(tmp_path)
    CharTokenizer.train(["ab"]).save(tmp_path / "char")
    assert detect_kind(tmp_path / "char") == "char"


def test_corrupt_and_missing_files_are_clear_errors(tmp_path):
    BPETokenizer.train([CORPUS], 270, progress=False).save(tmp_path / "bpe")
    (tmp_path / "bpe" / "merges.txt").unlink()
    with pytest.raises(GptlabError, match="merges.txt"):
        load_tokenizer(None, tmp_path / "bpe")
    CharTokenizer.train(["ab"]).save(tmp_path / "char")
    (tmp_path / "char" / "char_vocab.json").write_text('{"chars": [1, 2]')
    with pytest.raises(GptlabError, match="corrupt"):
        load_tokenizer(None, tmp_path / "char")
    (tmp_path / "sp").mkdir()
    (tmp_path / "sp" / "sentencepiece.model").write_bytes(b"not a model")
    with pytest.raises(GptlabError, match="corrupt"):
        load_tokenizer(None, tmp_path / "sp")


# ---- saving -----------------------------------------------------------------------------------
def test_save_replaces_a_tokenizer_but_never_other_files(tmp_path):
    out = tmp_path / "tok"
    save_tokenizer(CharTokenizer.train(["ab"]), out)
    save_tokenizer(CharTokenizer.train(["abc"]), out)  # re-running the same command is fine
    assert load_tokenizer(None, out).vocab_size == 7
    (out / "notes.txt").write_text("mine")
    with pytest.raises(GptlabError, match="not a valid tokenizer"):
        save_tokenizer(CharTokenizer.train(["abcd"]), out)
    assert (out / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok"]  # no staging left behind


# ---- corpus -----------------------------------------------------------------------------------
def test_read_corpus_files_directories_and_max_chars(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "b.txt").write_text("bbb")
    (tmp_path / "d" / "sub" / "a.txt").write_text("aaa")
    (tmp_path / "d" / "skip.bin").write_bytes(b"\0\1")
    (tmp_path / "c.txt").write_text("\ufeffccc")
    assert read_corpus([tmp_path / "c.txt", tmp_path / "d"]) == ["ccc", "bbb", "aaa"]
    assert read_corpus([tmp_path / "c.txt", tmp_path / "d"], max_chars=4) == ["ccc", "b"]


def test_read_corpus_bad_inputs(tmp_path):
    with pytest.raises(GptlabError, match="does not exist"):
        read_corpus([tmp_path / "missing.txt"])
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(GptlabError, match="no text"):
        read_corpus([tmp_path / "empty.txt"])
    (tmp_path / "model.bin").write_bytes(b"PK\x03\x04\0\0binary")
    with pytest.raises(GptlabError, match="binary"):
        read_corpus([tmp_path / "model.bin"])
    (tmp_path / "latin1.txt").write_bytes(bytes(range(0x80, 0x100)) * 4)
    with pytest.raises(GptlabError, match="not UTF-8"):
        read_corpus([tmp_path / "latin1.txt"])


def test_read_corpus_replaces_a_few_bad_bytes_with_a_warning(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"caf\xe9 " + b"ok text " * 10)
    with pytest.warns(UserWarning, match=r"a\.txt .*offset 3"):
        assert read_corpus([tmp_path / "a.txt"])[0].startswith("caf\ufffd ok")


# ---- streaming the text of ids one at a time ------------------------------------------------
@pytest.mark.parametrize("kind", ["sentencepiece", "cl100k"])
def test_text_streamed_token_by_token_is_the_decoded_text(kind, request):
    """SentencePiece writes one U+FFFD per byte of an unfinished character, bytes.decode one per
    character: TextStream must wait for both, and never hold back a real U+FFFD for long."""
    tokenizer = request.getfixturevalue(kind)
    pieces = ["ab", " ", "\n", "\r\n", "\x00", "😀", "e\u0301", "é", "中", "\ufffd", "①", "\u3000", "\ufeff"]
    rng = random.Random(0)
    for _ in range(300):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(1, 12)))
        ids = tokenizer.encode(text)
        stream = TextStream(tokenizer)
        assert "".join(stream.push(i) for i in ids) + stream.finish() == tokenizer.decode(ids), text

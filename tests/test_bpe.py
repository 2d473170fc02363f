"""The byte-level BPE tokenizer: training, the two encoders, decoding, files and interop."""

from __future__ import annotations

from collections import Counter

import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st

from gptlab.errors import GptlabError
from gptlab.tokenizers.base import SPECIAL_TOKENS
from gptlab.tokenizers.bpe import GPT2_PATTERN, GPT4_PATTERN, BPETokenizer

from data_files import SHAKESPEARE_TRAIN, SHAKESPEARE_VAL, read_text

# A little of everything UTF-8 has: accents, combining marks, CJK, emoji, digits, odd spacing.
MIXED = "naïve café résumé e\u0301 日本語の文章 中文 😀👍🏽 1234567 don't WE'LL\t\r\n  x\n\n" * 20


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return [read_text(SHAKESPEARE_TRAIN, 200_000), MIXED]


@pytest.fixture(scope="module")
def tokenizer(corpus) -> BPETokenizer:
    return BPETokenizer.train(corpus, 1024, progress=False)


@pytest.fixture(scope="module")
def gpt2_tokenizer(corpus) -> BPETokenizer:
    return BPETokenizer.train(corpus, 1024, pattern="gpt2", progress=False)


# Text that stresses the split and special-token rules, as well as arbitrary code points.
pieces = st.sampled_from(
    [*SPECIAL_TOKENS, "<EOS", " ", "  ", "\n", "\r\n", "'s", "'LL", "the", " and", "😀", "e\u0301"]
)
unicode_text = st.lists(st.one_of(st.text(max_size=8), pieces), max_size=12).map("".join)
# Unassigned code points (Cn) are left out where the two encoders are compared: the fast path
# splits with tiktoken's Rust regex and the reference with the `regex` module, and each carries
# its own Unicode tables, so they may disagree on whether a newly assigned code point is a letter.
text_with_surrogates = st.lists(
    st.one_of(st.text(st.characters(exclude_categories=("Cn",)), max_size=8), pieces), max_size=12
).map("".join)


# ---- training ----------------------------------------------------------------------------
def naive_merges(texts: list[str], pattern: str, n_merges: int) -> list[tuple[int, int]]:
    """The textbook trainer: recount every pair after every merge. Same rules, no cleverness."""
    chunks = Counter(c for text in texts for c in regex.findall(pattern, text))
    words = {tuple(chunk.encode("utf-8")): count for chunk, count in chunks.items()}
    token_bytes = [bytes([b]) for b in range(256)]
    merges, skipped = [], set()
    while len(merges) < n_merges:
        pairs = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        candidates = [(-count, pair) for pair, count in pairs.items() if count >= 2 and pair not in skipped]
        if not candidates:
            break
        (a, b) = min(candidates)[1]
        if token_bytes[a] + token_bytes[b] in token_bytes:
            skipped.add((a, b))
            continue
        new_id = len(token_bytes)
        token_bytes.append(token_bytes[a] + token_bytes[b])
        merges.append((a, b))
        merged = {}
        for word, count in words.items():
            out, i = [], 0
            while i < len(word):
                if word[i : i + 2] == (a, b):
                    out.append(new_id)
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + count
        words = merged
    return merges


@pytest.mark.parametrize("pattern", [GPT4_PATTERN, GPT2_PATTERN], ids=["gpt4", "gpt2"])
def test_incremental_trainer_matches_naive_recount(pattern):
    texts = [read_text(SHAKESPEARE_TRAIN, 30_000), MIXED]
    trained = BPETokenizer.train(texts, 260 + 300, pattern=pattern, progress=False)
    assert trained.merges == naive_merges(texts, pattern, 300)


def test_vocab_size_is_exact_and_specials_take_the_last_ids(tokenizer):
    assert tokenizer.vocab_size == 1024
    assert tokenizer.n_merges == 1024 - 260 == len(tokenizer.merges)
    assert tokenizer.special_tokens == {token: 1020 + i for i, token in enumerate(SPECIAL_TOKENS)}
    assert [tokenizer.pad_id, tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id] == [1020, 1021, 1022, 1023]
    assert all(a < 256 + rank and b < 256 + rank for rank, (a, b) in enumerate(tokenizer.merges))


def test_training_is_deterministic(corpus, tokenizer):
    again = BPETokenizer.train(corpus, 1024, progress=False)
    assert again.to_files() == tokenizer.to_files()


def test_chunks_never_cross_documents():
    joined = BPETokenizer.train(["ab" * 50], 262, progress=False)
    with pytest.warns(UserWarning):
        separate = BPETokenizer.train(["a", "b"] * 50, 262, progress=False)
    assert joined.merges[:2] == [(97, 98), (256, 256)]
    assert separate.n_merges == 0  # no pair occurs inside one document


def test_too_small_corpus_warns_and_shrinks():
    with pytest.warns(UserWarning, match="vocabulary has 262 ids"):
        small = BPETokenizer.train(["abcabc"], 1000, progress=False)
    assert small.vocab_size == 262 and small.merges == [(97, 98), (256, 99)]


@pytest.mark.parametrize("vocab_size", [0, 259])
def test_vocab_size_below_bytes_plus_specials_is_an_error(vocab_size):
    with pytest.raises(GptlabError, match="at least 260"):
        BPETokenizer.train(["some text"], vocab_size, progress=False)


def test_empty_corpus_is_an_error():
    with pytest.raises(GptlabError, match="empty"):
        BPETokenizer.train(["", ""], 300, progress=False)


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("(unclosed", "not a valid regex"),
        (r"\X", "does not compile in tiktoken"),  # `regex` knows it, tiktoken does not
        (r"\w*", "can match empty text"),
        (r"\p{L}+", "leaves some characters out of every piece"),
    ],
)
def test_bad_pattern_is_an_error_before_training(pattern, message):
    with pytest.raises(GptlabError, match=message):
        BPETokenizer.train(["text"], 300, pattern=pattern, progress=False)


def test_a_tokenizer_saved_with_a_pattern_the_trainer_now_refuses_still_loads(tmp_path):
    """The stricter checks are for new tokenizers: saved ones (and checkpoints) keep loading."""
    merges = BPETokenizer.train(["hello world\n" * 20], 262, pattern=r"\S+|\s+", progress=False).merges
    old = BPETokenizer(merges, pattern=r"\p{L}+|\s+")  # as an earlier gptlab could have saved it
    old.save(tmp_path / "tok")
    assert BPETokenizer.load(tmp_path / "tok").encode("hello world") == old.encode("hello world")


def test_a_custom_pattern_that_covers_all_text_round_trips():
    tokenizer = BPETokenizer.train(["hello world, hello there\n" * 20], 270, pattern=r"\S+|\s+", progress=False)
    text = "hi, 42! 中文 😀\n"
    assert tokenizer.decode(tokenizer.encode(text)) == text


# ---- encoding and decoding ----------------------------------------------------------------
@settings(max_examples=300, deadline=None)
@given(text=unicode_text)
def test_decode_inverts_encode(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.decode(tokenizer.encode(text, allowed_special="all")) == text


@settings(max_examples=300, deadline=None)
@given(text=text_with_surrogates, allowed=st.sampled_from([(), "all", {"<EOS>"}]))
def test_fast_encoder_equals_reference(tokenizer, gpt2_tokenizer, text, allowed):
    for tok in (tokenizer, gpt2_tokenizer):
        assert tok.encode(text, allowed) == tok.encode_reference(text, allowed)


def test_fast_encoder_equals_reference_on_val_txt(tokenizer, gpt2_tokenizer):
    val = read_text(SHAKESPEARE_VAL)
    for tok in (tokenizer, gpt2_tokenizer):
        ids = tok.encode(val)
        assert ids == tok.encode_reference(val)
        assert tok.decode(ids) == val


@pytest.mark.slow
def test_fast_encoder_equals_reference_on_train_txt(tokenizer):
    train = read_text(SHAKESPEARE_TRAIN)
    assert tokenizer.encode(train) == tokenizer.encode_reference(train)


def test_surrogates_follow_the_documented_policy(tokenizer):
    for text, expected in [("a\ud800b", "a\ufffdb"), ("\udfff", "\ufffd"), ("x\ud83d\ude00", "x😀")]:
        assert tokenizer.decode(tokenizer.encode(text)) == expected
        assert tokenizer.encode(text) == tokenizer.encode(expected) == tokenizer.encode_reference(text)


def test_special_tokens_are_text_unless_allowed(tokenizer):
    text = "to be<EOS> or <PAD>"
    eos, pad = tokenizer.eos_id, tokenizer.pad_id
    plain = tokenizer.encode(text)
    assert eos not in plain and pad not in plain
    assert tokenizer.encode(text, allowed_special={"<EOS>"}).count(eos) == 1
    assert pad not in tokenizer.encode(text, allowed_special={"<EOS>"})
    both = tokenizer.encode(text, allowed_special="all")
    assert both.count(eos) == 1 and both[-1] == pad
    assert tokenizer.decode(both) == text


def test_encode_batch_equals_encode(tokenizer):
    texts = ["first <EOS> text", "", MIXED, "x" * 1000]
    for allowed in [(), "all"]:
        assert tokenizer.encode_batch(texts, allowed) == [tokenizer.encode(t, allowed) for t in texts]


def test_decode_of_partial_character_replaces_it(tokenizer):
    assert tokenizer.decode([ord("a"), 0xE6, ord("b")]) == "a\ufffdb"  # 0xE6 starts a 3-byte character


def test_decode_out_of_range_is_an_error(tokenizer):
    with pytest.raises(GptlabError, match="outside the vocabulary"):
        tokenizer.decode([1, tokenizer.vocab_size])
    with pytest.raises(GptlabError, match="outside the vocabulary"):
        tokenizer.decode([-1])

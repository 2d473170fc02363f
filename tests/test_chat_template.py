"""The chat template (tokenizers/chat.py): markers added to every tokenizer kind, kept through
save/load and checkpoints' files, conversations encoded with user text left as text, and the
training mask that learns assistant tokens only."""

from __future__ import annotations

import pytest

from gptlab.errors import GptlabError
from gptlab.tokenizers import (
    BPETokenizer,
    CharTokenizer,
    SentencePieceTokenizer,
    TiktokenTokenizer,
    load_tokenizer,
    save_tokenizer,
    tokenizer_from_files,
)
from gptlab.tokenizers.chat import (
    CHAT_ROLES,
    CHAT_TOKENS,
    END_OF_TURN,
    ROLE_MARKERS,
    encode_chat,
    encode_chat_for_training,
    end_of_turn_id,
    has_chat_template,
    with_chat_tokens,
)

from data_files import cl100k_file

CORPUS = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "All:\nSpeak, speak.\n\nFirst Citizen:\nYou are all resolved rather to die than to famish?\n"
    "What is 2+3? It is 5. Be brief. <|user|> <|end|> |\n"
) * 20
CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Speak, speak."},
    {"role": "assistant", "content": "You are all resolved."},
    {"role": "user", "content": "What is 2+3?"},
    {"role": "assistant", "content": "It is 5."},
]


@pytest.fixture(scope="module")
def kinds() -> dict:
    """One tokenizer of every kind, without the chat markers."""
    return {
        "default": BPETokenizer.train([CORPUS], 300, progress=False),
        "tiktoken": TiktokenTokenizer.from_file(cl100k_file()),
        "sentencepiece": SentencePieceTokenizer.train([CORPUS], vocab_size=320),
        "char": CharTokenizer.train([CORPUS]),
    }


KIND_NAMES = ("default", "tiktoken", "sentencepiece", "char")


@pytest.mark.parametrize("kind", KIND_NAMES)
def test_markers_take_new_ids_and_leave_the_others_alone(kinds, kind):
    plain = kinds[kind]
    chat = with_chat_tokens(plain)
    assert not has_chat_template(plain) and has_chat_template(chat)
    assert chat.kind == plain.kind and type(chat) is type(plain)
    assert chat.vocab_size == plain.vocab_size + len(CHAT_TOKENS)
    assert [chat.special_tokens[t] for t in CHAT_TOKENS] == list(range(plain.vocab_size, chat.vocab_size))
    assert {t: chat.special_tokens[t] for t in plain.special_tokens} == plain.special_tokens
    assert chat.encode(CORPUS) == plain.encode(CORPUS)
    assert with_chat_tokens(chat) is chat  # idempotent
    assert chat.decode([end_of_turn_id(chat)]) == END_OF_TURN


@pytest.mark.parametrize("kind", KIND_NAMES)
def test_save_and_load_keep_the_template(kinds, kind, tmp_path):
    chat = with_chat_tokens(kinds[kind])
    save_tokenizer(chat, tmp_path / "tok")
    for loaded in (load_tokenizer(None, tmp_path / "tok"), tokenizer_from_files(kind, chat.to_files())):
        assert has_chat_template(loaded)
        assert loaded.special_tokens == chat.special_tokens
        assert encode_chat(loaded, CONVERSATION, True) == encode_chat(chat, CONVERSATION, True)
        assert loaded.fingerprint() == chat.fingerprint()
    assert chat.fingerprint() != kinds[kind].fingerprint()


@pytest.mark.parametrize("kind", KIND_NAMES)
def test_files_of_a_tokenizer_without_markers_are_unchanged(kinds, kind):
    """Adding the feature must not change the files (nor fingerprints) of existing tokenizers."""
    files = kinds[kind].to_files()
    assert all(b"added_special_tokens" not in data for data in files.values())


@pytest.mark.parametrize("kind", KIND_NAMES)
def test_round_trip_and_layout(kinds, kind):
    tok = with_chat_tokens(kinds[kind])
    ids = encode_chat(tok, CONVERSATION, add_generation_prompt=False)
    expected = "".join(ROLE_MARKERS[m["role"]] + m["content"] + END_OF_TURN for m in CONVERSATION)
    assert tok.decode(ids) == expected
    marker = {t: tok.special_tokens[t] for t in CHAT_TOKENS}
    assert ids[0] == marker["<|system|>"] and ids[-1] == marker[END_OF_TURN]
    assert ids[1:-1].count(marker[END_OF_TURN]) == len(CONVERSATION) - 1
    prompt = encode_chat(tok, CONVERSATION[:-1], add_generation_prompt=True)
    assert prompt[-1] == marker["<|assistant|>"]
    assert ids[: len(prompt)] == prompt  # the answer continues the prompt
    assert encode_chat(tok, [], add_generation_prompt=True) == [marker["<|assistant|>"]]


@pytest.mark.parametrize("kind", KIND_NAMES)
def test_marker_strings_in_user_text_stay_text(kinds, kind):
    tok = with_chat_tokens(kinds[kind])
    sneaky = "<|end|> <|user|> |"
    ids = encode_chat(tok, [{"role": "user", "content": sneaky}], add_generation_prompt=True)
    markers = set(tok.special_tokens.values())
    inner = ids[1:-2]  # between <|user|> and <|end|><|assistant|>
    assert inner == tok.encode(sneaky) and not markers & set(inner)
    assert len(set(ids) & markers) == 3


def test_training_mask_on_a_hand_made_conversation():
    tok = with_chat_tokens(CharTokenizer.train(["abcxyz"]))
    s, u, a, e = (tok.special_tokens[t] for t in CHAT_TOKENS)
    messages = [
        {"role": "system", "content": "x"},
        {"role": "user", "content": "ab"},
        {"role": "assistant", "content": "c"},
        {"role": "user", "content": "y"},
        {"role": "assistant", "content": "zz"},
    ]
    ids, learn = encode_chat_for_training(tok, messages)
    x, a_, b, c, y, z = (tok.encode(ch)[0] for ch in "xabcyz")
    assert ids == [s, x, e, u, a_, b, e, a, c, e, u, y, e, a, z, z, e]
    assert learn == [False] * 8 + [True, True] + [False] * 4 + [True, True, True]
    assert encode_chat(tok, messages, add_generation_prompt=False) == ids
    # weight 0 (OpenAI's field): that assistant turn is context, not learnt
    messages[2] = messages[2] | {"weight": 0}
    assert encode_chat_for_training(tok, messages)[1] == [False] * 14 + [True, True, True]


def test_roles_are_the_published_ones():
    assert CHAT_ROLES == ("system", "user", "assistant")
    assert CHAT_TOKENS == ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")


@pytest.mark.parametrize(
    ("messages", "error"),
    [
        ([{"role": "robot", "content": "hi"}], "message 1 has role 'robot'; use one of system, user, assistant"),
        ([{"content": "hi"}], "message 1 has role missing"),
        ([{"role": "user", "content": "hi"}, {"role": "user", "content": 3}], "message 2 .user. has content a int"),
        ([{"role": "user"}], "has content missing"),
        (["hi"], "message 1 is not an object"),
        ({"role": "user", "content": "hi"}, "messages must be a list"),
        ([{"role": "assistant", "content": "hi", "weight": 0.5}], "weight 0.5; it must be 0 or 1"),
    ],
)
def test_bad_messages_are_one_line_errors(messages, error):
    tok = with_chat_tokens(CharTokenizer.train(["hi"]))
    with pytest.raises(GptlabError, match=error):
        encode_chat(tok, messages, add_generation_prompt=True)


def test_a_tokenizer_without_the_template_is_a_clear_error():
    tok = CharTokenizer.train(["hi"])
    for call in (
        lambda: encode_chat(tok, [], True),
        lambda: encode_chat_for_training(tok, []),
        lambda: end_of_turn_id(tok),
    ):
        with pytest.raises(GptlabError, match="no chat template"):
            call()


def test_corrupt_added_tokens_in_files_are_clear_errors(kinds):
    files = with_chat_tokens(kinds["char"]).to_files()
    files["char_vocab.json"] = files["char_vocab.json"].replace(b'"<|user|>"', b'"<|system|>"')
    with pytest.raises(GptlabError, match="corrupt|repeat"):
        tokenizer_from_files("char", files)
    files = with_chat_tokens(kinds["default"]).to_files()
    files["tokenizer_config.json"] = files["tokenizer_config.json"].replace(b'"<|end|>"\n', b"7\n")
    with pytest.raises(GptlabError, match="added_special_tokens"):
        tokenizer_from_files("default", files)

"""The chat template exported to Hugging Face: `AutoTokenizer.apply_chat_template` gives exactly
gptlab's encode_chat ids, and generate() is told to stop at <|end|>."""

import json

import pytest

from gptlab.interop import export_hf
from gptlab.tokenizers import BPETokenizer, TiktokenTokenizer
from gptlab.tokenizers.chat import CHAT_TEMPLATE_JINJA, encode_chat, end_of_turn_id, with_chat_tokens
from gptlab.tokenizers.tiktoken_adapter import KNOWN_ENCODINGS

from data_files import SHAKESPEARE_VAL, read_text
from gpt2_dirs import gpt2_ordered_ranks
from helpers import random_gpt

transformers = pytest.importorskip("transformers")
pytest.importorskip("jinja2")  # apply_chat_template renders with it

GPT2_LAYOUT = dict(pos_encoding="learned", norm="layernorm", activation="gelu")
CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [
        {"role": "system", "content": "You are a terse assistant.\nAnswer in one line."},
        {"role": "user", "content": "What is 12 + 30?"},
        {"role": "assistant", "content": "42"},
        {"role": "user", "content": "naïve café, 日本語 😀\n\n  spaces  "},
        {"role": "assistant", "content": "  leading spaces and a tab\t"},
    ],
]


@pytest.fixture(scope="module")
def corpus() -> str:
    return read_text(SHAKESPEARE_VAL, 20_000)


def _chat_ids(hf_tokenizer, messages, add_generation_prompt):
    ids = hf_tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)  # a BatchEncoding in transformers 5


@pytest.mark.parametrize("kind", ["default", "tiktoken"])
def test_apply_chat_template_gives_our_ids(kind, corpus, tmp_path):
    bpe = BPETokenizer.train([corpus], 400, progress=False)
    if kind == "default":
        plain = bpe
    else:  # a GPT-2-like encoding (its own byte order, <|endoftext|>) as tiktoken
        ranks = gpt2_ordered_ranks(bpe)
        plain = TiktokenTokenizer("small", ranks, KNOWN_ENCODINGS["gpt2"][0], {"<|endoftext|>": len(ranks)})
    tokenizer = with_chat_tokens(plain)
    export_hf(random_gpt(tokenizer.vocab_size, **GPT2_LAYOUT), tokenizer, tmp_path / "hf")

    config = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert config["chat_template"] == CHAT_TEMPLATE_JINJA
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for messages in CONVERSATIONS:
        for add_generation_prompt in (False, True):
            expected = encode_chat(tokenizer, messages, add_generation_prompt)
            assert _chat_ids(hf_tokenizer, messages, add_generation_prompt) == expected, messages
    generation = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [tokenizer.eos_id, end_of_turn_id(tokenizer)]


def test_a_tokenizer_without_markers_exports_no_template(corpus, tmp_path):
    bpe = BPETokenizer.train([corpus], 300, progress=False)
    export_hf(random_gpt(bpe.vocab_size, **GPT2_LAYOUT), bpe, tmp_path / "hf")
    assert "chat_template" not in json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert not (tmp_path / "hf" / "generation_config.json").exists()

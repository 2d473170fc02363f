"""Our byte-level BPE tokenizers as Hugging Face tokenizer files, giving the same ids.

A BPE is described by its tokens (bytes -> id), its merges in rank order, its split regex and
its special tokens. We write it four ways at once: `vocab.json` + `merges.txt` (what GPT-2's
tokenizer classes read), `tokenizer.json` (the `tokenizers` library's full description, which
carries our split regex), and `tokenizer_config.json` + `special_tokens_map.json` (which say
which ids are <BOS>, <EOS>, <PAD>, <UNK>). `AutoTokenizer` loads `tokenizer.json`:

- pre-tokenizer: Split on our regex, then ByteLevel(use_regex=False), which only maps bytes
  to GPT-2's printable characters (its own regex is GPT-2's and would split differently);
- model: BPE with ignore_merges=True, because tiktoken (our encoder) takes a chunk that is a
  whole token as that token without running the merges.

HF always reads special tokens in the text as special, like our `allowed_special="all"`.

A tokenizer with the chat markers (tokenizers/chat.py) also gets `chat_template`, the same
template in Jinja, so `apply_chat_template(messages, tokenize=True, add_generation_prompt=...)`
gives exactly `encode_chat`'s ids (for content without marker strings, which HF would read
as markers).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from gptlab.errors import GptlabError
from gptlab.tokenizers import bpe, tiktoken_adapter
from gptlab.tokenizers.base import BOS, EOS, PAD, UNK, Tokenizer
from gptlab.tokenizers.bpe import _merge_below
from gptlab.tokenizers.byte_level import (
    read_merges_txt,
    read_tiktoken,
    read_vocab_json,
    token_to_text,
)
from gptlab.tokenizers.chat import CHAT_TEMPLATE_JINJA, has_chat_template


@dataclass(frozen=True)
class ByteLevelBPE:
    """Everything a byte-level BPE encoder needs, whatever file format it came from."""

    token_ids: dict[bytes, int]  # ordinary tokens only
    merges: list[tuple[bytes, bytes]]  # in rank order
    pattern: str
    special_tokens: dict[str, int]


def as_byte_level_bpe(tokenizer: Tokenizer) -> ByteLevelBPE:
    """The BPE behind a default or tiktoken tokenizer (read from its files, so no private state),
    or GptlabError for the kinds that have no faithful Hugging Face equivalent."""
    files = tokenizer.to_files()
    specials = tokenizer.special_tokens
    if tokenizer.kind == "default":
        config = json.loads(files[bpe.CONFIG_FILE])
        token_ids = read_vocab_json(files[bpe.VOCAB_FILE], set(specials))
        merges = read_merges_txt(files[bpe.MERGES_FILE])
        return ByteLevelBPE(token_ids, merges, config["pattern"], specials)
    if tokenizer.kind == "tiktoken":
        config = json.loads(files[tiktoken_adapter.CONFIG_FILE])
        ranks = read_tiktoken(files[tiktoken_adapter.RANKS_FILE], tiktoken_adapter.RANKS_FILE)
        return ByteLevelBPE(ranks, merges_of_ranks(ranks), config["pattern"], specials)
    raise GptlabError(
        f"a {tokenizer.kind} tokenizer has no faithful Hugging Face equivalent (only default BPE and "
        "tiktoken ones do); export with --format safetensors instead"
    )


def merges_of_ranks(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merge list implied by tiktoken ranks: each multi-byte token, by rank, split into the
    two parts BPE ends with on its bytes when only lower ranks may merge."""
    merges = []
    for token in sorted((t for t in ranks if len(t) > 1), key=ranks.__getitem__):
        parts = _merge_below(token, ranks, ranks[token])
        if len(parts) != 2:
            raise GptlabError(
                f"token {token!r} is not a merge of two lower-rank tokens, so no merges.txt can "
                "reproduce this encoding; export with --format safetensors instead"
            )
        merges.append((parts[0], parts[1]))
    return merges


def hf_tokenizer_files(tokenizer: Tokenizer, model_max_length: int) -> dict[str, bytes]:
    """The Hugging Face files of `tokenizer`: file name -> contents."""
    bpe_model = as_byte_level_bpe(tokenizer)
    vocab = {token_to_text(token): i for token, i in bpe_model.token_ids.items()}
    vocab |= bpe_model.special_tokens  # GPT-2 too keeps <|endoftext|> in vocab.json
    merges = [f"{token_to_text(left)} {token_to_text(right)}" for left, right in bpe_model.merges]
    specials = sorted(bpe_model.special_tokens.items(), key=lambda item: item[1])
    roles = {"bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": PAD}
    extra = [token for token, _ in specials if token not in roles.values()]
    special_tokens_map = roles | ({"additional_special_tokens": extra} if extra else {})
    files = {
        "vocab.json": vocab,
        "tokenizer.json": _tokenizer_json(vocab, merges, bpe_model.pattern, specials),
        "tokenizer_config.json": {
            # The generic class loads tokenizer.json exactly as written (GPT-2's would impose its regex).
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": model_max_length,
            **special_tokens_map,
            "add_bos_token": False,
            "add_eos_token": False,
            "add_prefix_space": False,
            "clean_up_tokenization_spaces": False,
            "added_tokens_decoder": {str(i): _added_token(token) for token, i in specials},
        },
        "special_tokens_map.json": special_tokens_map,
    }
    if has_chat_template(tokenizer):
        files["tokenizer_config.json"]["chat_template"] = CHAT_TEMPLATE_JINJA
    encoded = {name: json.dumps(value, ensure_ascii=False, indent=1).encode("utf-8") for name, value in files.items()}
    encoded["merges.txt"] = ("\n".join(["#version: 0.2", *merges]) + "\n").encode("utf-8")
    return encoded


def _added_token(content: str) -> dict:
    return {
        "content": content,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": False,
        "special": True,
    }


def _tokenizer_json(vocab: dict[str, int], merges: list[str], pattern: str, specials: list[tuple[str, int]]) -> dict:
    """The `tokenizers` library's serialized Tokenizer (format 1.0)."""
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [{"id": i, **_added_token(token)} for token, i in specials],
        "normalizer": None,
        "pre_tokenizer": {
            "type": "Sequence",
            "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": pattern}, "behavior": "Isolated", "invert": False},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
            ],
        },
        "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": True,
            "vocab": vocab,
            "merges": merges,
        },
    }

"""The character tokenizer: one id per character seen in the training text.

Ids 0..3 are <PAD> <UNK> <BOS> <EOS> (the same layout as our sentencepiece models); the
corpus's characters follow in sorted order, then any added special tokens (the chat markers,
tokenizers/chat.py). A character the corpus never showed encodes as
<UNK>, so `decode(encode(s)) == s` holds only for text made of known characters.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence

from gptlab.errors import GptlabError
from gptlab.tokenizers.base import SPECIAL_TOKENS, AllowedSpecial, Tokenizer, allowed_set, check_added_specials

VOCAB_FILE = "char_vocab.json"
FORMAT_VERSION = 1


def split_on_specials(text: str, allowed: set[str]) -> list[tuple[str, bool]]:
    """`text` cut into (piece, is_special) pairs at each occurrence of an allowed special token."""
    if not allowed:
        return [(text, False)]
    # Longest first, so that a special token that prefixes another never wins over it.
    pattern = "(" + "|".join(re.escape(s) for s in sorted(allowed, key=len, reverse=True)) + ")"
    # re.split with one group alternates plain text (even indices) and matches (odd indices).
    return [(piece, i % 2 == 1) for i, piece in enumerate(re.split(pattern, text)) if piece]


class CharTokenizer(Tokenizer):
    """Characters <-> ids, with the four special tokens first."""

    kind = "char"

    def __init__(self, chars: Iterable[str], added_special: Sequence[str] = ()):
        chars = sorted(set(chars))
        if any(len(c) != 1 for c in chars):
            raise GptlabError("a character vocabulary holds single characters only; retrain the char tokenizer")
        self._chars = chars
        self._added = check_added_specials(tuple(added_special))
        self._tokens = list(SPECIAL_TOKENS) + chars + list(self._added)  # id -> string
        self._special = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
        self._special |= {token: len(SPECIAL_TOKENS) + len(chars) + i for i, token in enumerate(self._added)}
        self._char_ids = {c: len(SPECIAL_TOKENS) + i for i, c in enumerate(chars)}

    @classmethod
    def train(cls, texts: Iterable[str]) -> CharTokenizer:
        """The vocabulary of every character in `texts`."""
        chars: set[str] = set()
        for text in texts:
            chars.update(text)
        if not chars:
            raise GptlabError("cannot build a char tokenizer from empty text; pass a corpus with text in it")
        return cls(chars)

    @property
    def vocab_size(self) -> int:
        return len(self._tokens)

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._special)

    @property
    def added_special_tokens(self) -> tuple[str, ...]:
        return self._added

    def _with_added(self, added: tuple[str, ...]) -> CharTokenizer:
        return CharTokenizer(self._chars, added)

    def encode(self, text: str, allowed_special: AllowedSpecial = ()) -> list[int]:
        ids: list[int] = []
        unk = self.unk_id
        for piece, is_special in split_on_specials(text, allowed_set(allowed_special, self._special)):
            if is_special:
                ids.append(self._special[piece])
            else:
                ids.extend(self._char_ids.get(c, unk) for c in piece)
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self._tokens[i] for i in self.check_ids(ids))

    def to_files(self) -> dict[str, bytes]:
        vocab = {
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "special_tokens": self._special,
            "chars": self._chars,
        }
        if self._added:  # only then, so that older tokenizers' files (and fingerprints) stay the same
            vocab["added_special_tokens"] = list(self._added)
        return {VOCAB_FILE: json.dumps(vocab, indent=1).encode()}

    @classmethod
    def from_files(cls, files: dict[str, bytes]) -> CharTokenizer:
        if VOCAB_FILE not in files:
            raise GptlabError(f"char tokenizer file {VOCAB_FILE} is missing; retrain the tokenizer")
        try:
            vocab = json.loads(files[VOCAB_FILE])
            chars = vocab["chars"]
            specials = vocab["special_tokens"]
            added = vocab.get("added_special_tokens", [])
            tokenizer = cls(chars, check_added_specials(added, f"{VOCAB_FILE}'s added_special_tokens"))
        except (ValueError, KeyError, TypeError, AttributeError):
            raise GptlabError(f"{VOCAB_FILE} is corrupt; retrain the char tokenizer") from None
        if specials != tokenizer._special or tokenizer._chars != chars:
            raise GptlabError(f"{VOCAB_FILE} is corrupt (ids out of order); retrain the char tokenizer")
        return tokenizer

"""SentencePiece models (Llama-style `.model` files, or ones trained here) as gptlab tokenizers.

Models trained here put <PAD> <UNK> <BOS> <EOS> at ids 0..3 as the model's own pad/unk/bos/eos
pieces, fall back to bytes for characters outside the vocabulary, and use the identity
normaliser with extra whitespace kept, so `decode(encode(s)) == s` for any text without
U+2581 ("▁", which SentencePiece uses to mark spaces and so decodes as a space).

A foreign model keeps its ids: our special tokens map onto its pad/unk/bos/eos ids, and any of
the four it lacks (many have no pad) gets a new id after the model's last piece, in the order
<PAD> <UNK> <BOS> <EOS>. Added special tokens (the chat markers, tokenizers/chat.py) take the
ids after those and are kept in `added_tokens.json` beside the model. Every special id decodes to its token string (`<EOS>`), in every kind.
"""

from __future__ import annotations

import io
import json
import re
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import sentencepiece as spm

from gptlab.errors import GptlabError
from gptlab.tokenizers.base import SPECIAL_TOKENS, AllowedSpecial, Tokenizer, allowed_set, check_added_specials
from gptlab.tokenizers.char import split_on_specials

MODEL_FILE = "sentencepiece.model"
ADDED_FILE = "added_tokens.json"  # written only when there are added special tokens
MODEL_TYPES = ("bpe", "unigram", "char", "word")
# Lines longer than this are dropped by the trainer; the default (4192 bytes) would silently
# skip whole paragraphs of corpora that keep one paragraph per line.
_MAX_LINE_BYTES = 1 << 16


def _lines(texts: Iterable[str]) -> Iterator[str]:
    # SentencePiece trains on "sentences"; newlines are left to byte fallback (one id each).
    for text in texts:
        yield from (line for line in text.split("\n") if line)


def _train_proto(texts: Iterable[str], vocab_size: int, model_type: str) -> bytes:
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=_lines(texts),
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        **{f"{name}_id": i for i, name in enumerate(("pad", "unk", "bos", "eos"))},
        **{f"{name}_piece": token for name, token in zip(("pad", "unk", "bos", "eos"), SPECIAL_TOKENS)},
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        max_sentence_length=_MAX_LINE_BYTES,
        minloglevel=2,
    )
    return model.getvalue()


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model, with our special tokens mapped onto its own."""

    kind = "sentencepiece"

    def __init__(self, model_proto: bytes, added_special: Sequence[str] = ()):
        self._proto = model_proto
        self._sp = spm.SentencePieceProcessor()
        try:
            self._sp.LoadFromSerializedProto(model_proto)
        except RuntimeError:
            raise GptlabError("the sentencepiece model is corrupt; retrain it or pass another .model file") from None
        own_ids = (self._sp.pad_id(), self._sp.unk_id(), self._sp.bos_id(), self._sp.eos_id())
        next_id = self._sp.get_piece_size()
        self._special: dict[str, int] = {}
        for token, own_id in zip(SPECIAL_TOKENS, own_ids):
            if own_id < 0:  # the model lacks this one: give it a new id after its pieces
                own_id, next_id = next_id, next_id + 1
            self._special[token] = own_id
        self._added = check_added_specials(tuple(added_special))
        for token in self._added:
            self._special[token], next_id = next_id, next_id + 1
        self._vocab_size = next_id
        self._token_of_id = {i: token for token, i in self._special.items()}

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, model_type: str = "bpe") -> SentencePieceTokenizer:
        """Train a model on `texts` with exactly `vocab_size` ids; a corpus too small for that
        many gives a warning and the largest size it supports."""
        if model_type not in MODEL_TYPES:
            raise GptlabError(f"unknown sentencepiece model type {model_type!r}; use one of {', '.join(MODEL_TYPES)}")
        texts = list(texts)
        try:
            return cls(_train_proto(texts, vocab_size, model_type))
        except RuntimeError as error:
            message = str(error)
        too_high = re.search(r"Vocabulary size too high .*<= (\d+)", message)
        if too_high:
            supported = int(too_high.group(1))
            warnings.warn(
                f"the corpus supports only {supported} sentencepiece tokens, not {vocab_size}; "
                f"trained {supported} (use more text for a larger vocabulary)",
                stacklevel=2,
            )
            return cls(_train_proto(texts, supported, model_type))
        too_low = re.search(r"smaller than required_chars\. \d+ vs (\d+)", message)
        if too_low:
            raise GptlabError(
                f"vocab_size {vocab_size} is too small for sentencepiece on this corpus; use at least "
                f"{too_low.group(1)} (256 byte pieces, 4 special tokens and the corpus's characters)"
            )
        raise GptlabError(f"sentencepiece training failed: {message.splitlines()[-1]}")

    @classmethod
    def from_path(cls, path: str | Path) -> SentencePieceTokenizer:
        """A `.model` file, or a directory holding exactly one."""
        path = Path(path)
        if path.is_dir():
            models = sorted(path.glob("*.model"))
            if len(models) != 1:
                raise GptlabError(f"{path} should hold exactly one sentencepiece .model file, found {len(models)}")
            path = models[0]
        if not path.is_file():
            raise GptlabError(f"sentencepiece model {path} not found; pass a .model file or its directory")
        added_file = path.parent / ADDED_FILE
        added = _read_added(added_file.read_bytes()) if added_file.is_file() else ()
        return cls(path.read_bytes(), added)

    # ---- the Tokenizer protocol --------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._special)

    @property
    def added_special_tokens(self) -> tuple[str, ...]:
        return self._added

    def _with_added(self, added: tuple[str, ...]) -> SentencePieceTokenizer:
        return SentencePieceTokenizer(self._proto, added)

    def encode(self, text: str, allowed_special: AllowedSpecial = ()) -> list[int]:
        ids: list[int] = []
        for piece, is_special in split_on_specials(text, allowed_set(allowed_special, self._special)):
            if is_special:
                ids.append(self._special[piece])
            else:
                ids.extend(self._sp.encode(piece))
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        # Special ids become their strings; the runs of ordinary ids between them go to sentencepiece.
        parts: list[str] = []
        run: list[int] = []
        for i in self.check_ids(ids):
            if i in self._token_of_id:
                parts.extend((self._sp.decode(run), self._token_of_id[i]))
                run = []
            else:
                run.append(i)
        parts.append(self._sp.decode(run))
        return "".join(parts)

    def to_files(self) -> dict[str, bytes]:
        files = {MODEL_FILE: self._proto}
        if self._added:
            files[ADDED_FILE] = json.dumps({"added_special_tokens": list(self._added)}, indent=1).encode()
        return files

    @classmethod
    def from_files(cls, files: dict[str, bytes]) -> SentencePieceTokenizer:
        models = [name for name in files if name.endswith(".model")]
        added = _read_added(files[ADDED_FILE]) if ADDED_FILE in files else ()
        if MODEL_FILE in files:
            return cls(files[MODEL_FILE], added)
        if len(models) == 1:
            return cls(files[models[0]], added)
        raise GptlabError(f"expected one sentencepiece .model file, found {len(models)}; retrain the tokenizer")


def _read_added(data: bytes) -> tuple[str, ...]:
    """The added special tokens listed in added_tokens.json."""
    try:
        added = json.loads(data)["added_special_tokens"]
    except (ValueError, KeyError, TypeError):
        raise GptlabError(f"{ADDED_FILE} is corrupt; save the sentencepiece tokenizer again") from None
    return check_added_specials(added, f"{ADDED_FILE}'s added_special_tokens")

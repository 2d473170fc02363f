"""What every tokenizer kind shares: the protocol, the special tokens, and file handling."""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from collections.abc import Collection, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

from gptlab.errors import GptlabError
from gptlab.files import write_atomic

PAD, UNK, BOS, EOS = "<PAD>", "<UNK>", "<BOS>", "<EOS>"
SPECIAL_TOKENS: tuple[str, ...] = (PAD, UNK, BOS, EOS)

AllowedSpecial = Literal["all"] | Collection[str]


class TokenizerEngineError(GptlabError):
    """A tokenizer's native engine failed on a text (tiktoken panics when its regex engine gives
    up backtracking). The text is not at fault but the tokenizer's split pattern is, so callers
    that serve many texts may answer it as a client error; the CLI prints it as one line."""


@contextmanager
def engine_errors(kind: str) -> Iterator[None]:
    """Turn a panic of a Rust engine (pyo3's PanicException, a BaseException) into a
    TokenizerEngineError; everything else passes through unchanged."""
    try:
        yield
    except BaseException as err:
        if type(err).__name__ != "PanicException":
            raise
        reason = (str(err).strip().splitlines() or ["panic"])[0][:160]
        raise TokenizerEngineError(
            f"the {kind} tokenizer's engine failed on this text ({reason}); its split pattern backtracks too much, "
            "re-train the tokenizer with --pattern gpt4"
        ) from None


class Tokenizer(ABC):
    """Text <-> token ids. Every kind (default BPE, tiktoken, sentencepiece, char) implements this.

    A tokenizer is fully described by the files `to_files()` returns: `save(dir)` writes them,
    `load(dir)` reads them back, and checkpoints embed them so a model carries its tokenizer.
    """

    kind: str  # the name load_tokenizer() knows it by

    # ---- what each kind provides -------------------------------------------------------
    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids, special tokens included."""

    @property
    @abstractmethod
    def special_tokens(self) -> dict[str, int]:
        """Special token -> id, for at least <PAD> <UNK> <BOS> <EOS>."""

    @abstractmethod
    def encode(self, text: str, allowed_special: AllowedSpecial = ()) -> list[int]:
        """Ids of `text`. Special tokens in the text are plain text unless `allowed_special`
        ("all" or a collection of their strings) admits them."""

    @abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; raises GptlabError for an id outside the vocabulary."""

    @abstractmethod
    def to_files(self) -> dict[str, bytes]:
        """The files that describe this tokenizer: file name -> contents."""

    @classmethod
    @abstractmethod
    def from_files(cls, files: dict[str, bytes]) -> Tokenizer:
        """Rebuild the tokenizer from what to_files() returned."""

    # ---- added special tokens (the chat markers) -----------------------------------------
    @property
    def added_special_tokens(self) -> tuple[str, ...]:
        """Special tokens added after the kind's own ids (with_special_tokens), in id order."""
        return ()

    def with_special_tokens(self, tokens: Iterable[str]) -> Tokenizer:
        """This tokenizer with `tokens` as extra special tokens on new ids after its last one;
        every existing id is unchanged and tokens it already has are skipped (so it is
        idempotent). The added tokens are part of to_files(), so they travel with the tokenizer."""
        new = [token for token in dict.fromkeys(tokens) if token not in self.special_tokens]
        if not new:
            return self
        return self._with_added(check_added_specials(self.added_special_tokens + tuple(new)))

    def _with_added(self, added: tuple[str, ...]) -> Tokenizer:
        """A copy of this tokenizer whose added special tokens are `added`; kinds that can take
        added tokens override it."""
        raise GptlabError(f"the {self.kind} tokenizer cannot take added special tokens; use another kind")

    # ---- shared behaviour -------------------------------------------------------------
    def encode_batch(
        self, texts: list[str], allowed_special: AllowedSpecial = (), num_threads: int = 8
    ) -> list[list[int]]:
        """encode() for many texts; kinds with a thread-safe native engine run them in threads."""
        if num_threads <= 1 or len(texts) <= 1:
            return [self.encode(text, allowed_special) for text in texts]
        with ThreadPoolExecutor(num_threads) as pool:
            return list(pool.map(lambda text: self.encode(text, allowed_special), texts))

    @property
    def pad_id(self) -> int:
        return self.special_tokens[PAD]

    @property
    def unk_id(self) -> int:
        return self.special_tokens[UNK]

    @property
    def bos_id(self) -> int:
        return self.special_tokens[BOS]

    @property
    def eos_id(self) -> int:
        return self.special_tokens[EOS]

    def fingerprint(self) -> str:
        """A short hash of the tokenizer's files: equal fingerprints encode identically."""
        digest = hashlib.sha256(self.kind.encode())
        for name, data in sorted(self.to_files().items()):
            digest.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
        return digest.hexdigest()[:16]

    def save(self, directory: str | Path) -> None:
        """Write the tokenizer's files into `directory` (created if needed); each file atomically."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name, data in self.to_files().items():
            write_atomic(directory / name, data)

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        """Read a tokenizer saved by save()."""
        directory = Path(directory)
        if not directory.is_dir():
            raise GptlabError(f"tokenizer directory {directory} not found")
        files = {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}
        return cls.from_files(files)

    def check_ids(self, ids: Iterable[int]) -> list[int]:
        """The ids as a list, or GptlabError naming the first one outside the vocabulary."""
        ids = [int(i) for i in ids]
        bad = next((i for i in ids if not 0 <= i < self.vocab_size), None)
        if bad is not None:
            raise GptlabError(f"token id {bad} is outside the vocabulary (0..{self.vocab_size - 1})")
        return ids


def check_added_specials(tokens: Sequence[object], where: str = "the added special tokens") -> tuple[str, ...]:
    """`tokens` as a tuple of distinct non-empty strings that are not <PAD> <UNK> <BOS> <EOS>;
    GptlabError otherwise (a tokenizer file that was edited by hand, or a caller's mistake)."""
    if not isinstance(tokens, (list, tuple)) or not all(isinstance(t, str) and t for t in tokens):
        raise GptlabError(f"{where} must be a list of non-empty strings; save the tokenizer again")
    if len(set(tokens)) != len(tokens) or set(tokens) & set(SPECIAL_TOKENS):
        raise GptlabError(f"{where} repeat a special token; save the tokenizer again")
    return tuple(tokens)


def allowed_set(allowed_special: AllowedSpecial, specials: Iterable[str]) -> set[str]:
    """The special-token strings that `allowed_special` admits."""
    specials = set(specials)
    if allowed_special == "all":
        return specials
    return specials & set(allowed_special)

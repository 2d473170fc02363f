"""Tokenizers: every kind behind one protocol, found by name (`load_tokenizer`) or by its files.

Kinds: `default` (our byte-level BPE), `tiktoken` (OpenAI's encodings), `sentencepiece`, `char`.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import tiktoken

from gptlab.errors import GptlabError
from gptlab.files import holds_only, staged_directory
from gptlab.tokenizers.base import SPECIAL_TOKENS, Tokenizer, TokenizerEngineError
from gptlab.tokenizers.bpe import BPETokenizer
from gptlab.tokenizers.char import CharTokenizer
from gptlab.tokenizers.sentencepiece_adapter import SentencePieceTokenizer
from gptlab.tokenizers.tiktoken_adapter import TiktokenTokenizer

__all__ = [
    "KINDS",
    "check_output_dir",
    "SPECIAL_TOKENS",
    "BPETokenizer",
    "CharTokenizer",
    "SentencePieceTokenizer",
    "TiktokenTokenizer",
    "Tokenizer",
    "TokenizerEngineError",
    "detect_kind",
    "load_tokenizer",
    "save_tokenizer",
    "tokenizer_from_files",
    "train_tokenizer",
]

KINDS = ("default", "tiktoken", "sentencepiece", "char")
_CLASSES: dict[str, type[Tokenizer]] = {
    "default": BPETokenizer,
    "tiktoken": TiktokenTokenizer,
    "sentencepiece": SentencePieceTokenizer,
    "char": CharTokenizer,
}
# Files that tell a directory's kind, in the order they are looked for.
_MARKER_FILES = (
    ("tokenizer_config.json", "default"),
    ("char_vocab.json", "char"),
    ("tiktoken_config.json", "tiktoken"),
    ("*.model", "sentencepiece"),
    ("*.tiktoken", "tiktoken"),
)
# Bad bytes in a tokenizer's files surface as these; they mean "corrupt file", not a bug here.
_CORRUPT_FILE_ERRORS = (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError)


def _check_kind(kind: str) -> type[Tokenizer]:
    if kind not in _CLASSES:
        raise GptlabError(f"unknown tokenizer kind {kind!r}; use one of {', '.join(KINDS)}")
    return _CLASSES[kind]


def detect_kind(path: str | Path) -> str:
    """The kind of tokenizer at `path`: a directory (by its files), a `.model` or `.tiktoken`
    file, or the name of a tiktoken encoding such as `cl100k_base`."""
    path = Path(path)
    if path.is_dir():
        for pattern, kind in _MARKER_FILES:
            if any(path.glob(pattern)):
                return kind
        raise GptlabError(f"{path} holds no tokenizer files; train one there or pass another --tokenizer")
    if path.is_file():
        kinds_by_suffix = {".model": "sentencepiece", ".tiktoken": "tiktoken"}
        if path.suffix in kinds_by_suffix:
            return kinds_by_suffix[path.suffix]
        raise GptlabError(f"cannot tell the tokenizer kind of {path}; pass its directory or --type")
    if str(path) in tiktoken.list_encoding_names():
        return "tiktoken"
    raise GptlabError(f"tokenizer {path} not found; train one with `gptlab tokenizer train` or fix the path")


def load_tokenizer(kind: str | None, path: str | Path) -> Tokenizer:
    """The tokenizer of `kind` (detected from `path` when None) stored at `path`: a directory
    written by save(), or for sentencepiece a `.model` file, for tiktoken a `.tiktoken` file
    or an encoding name."""
    kind = kind or detect_kind(path)
    cls = _check_kind(kind)
    try:
        if cls is TiktokenTokenizer:
            return TiktokenTokenizer.from_path_or_name(path)
        if cls is SentencePieceTokenizer:
            return SentencePieceTokenizer.from_path(path)
        return cls.load(path)
    except _CORRUPT_FILE_ERRORS as error:
        raise GptlabError(f"the {kind} tokenizer at {path} is corrupt ({error}); train or save it again") from None
    except OSError as error:
        raise GptlabError(f"cannot read the tokenizer at {path} ({error.strerror}); check the path") from None


def tokenizer_from_files(kind: str, files: dict[str, bytes]) -> Tokenizer:
    """Rebuild a tokenizer from its files (as embedded in a checkpoint by `to_files()`)."""
    cls = _check_kind(kind)
    try:
        return cls.from_files(files)
    except _CORRUPT_FILE_ERRORS as error:
        raise GptlabError(f"the embedded {kind} tokenizer is corrupt ({error}); re-save the checkpoint") from None


def train_tokenizer(
    kind: str, texts: Iterable[str], vocab_size: int | None, pattern: str = "gpt4", progress: bool = True
) -> Tokenizer:
    """Train a tokenizer of `kind` on `texts`. `vocab_size` counts the special tokens; the char
    kind takes its size from the corpus and ignores it. tiktoken encodings cannot be trained."""
    _check_kind(kind)
    if kind == "char":
        return CharTokenizer.train(texts)
    if kind == "tiktoken":
        raise GptlabError("tiktoken encodings come pretrained; load one with --type tiktoken --tokenizer cl100k_base")
    if vocab_size is None:
        raise GptlabError(f"the {kind} tokenizer needs a vocabulary size; pass --vocab_size")
    if kind == "sentencepiece":
        return SentencePieceTokenizer.train(texts, vocab_size)
    return BPETokenizer.train(texts, vocab_size, pattern=pattern, progress=progress)


def _is_replaceable(directory: Path) -> bool:
    """True if `directory` is empty or holds exactly the files of a tokenizer we could have
    written (so a downloaded `tokenizer.model` or a folder of data is never replaced)."""
    if holds_only(directory, ()):  # empty
        return True
    try:
        ours = set(load_tokenizer(None, directory).to_files())
    except GptlabError:
        return False
    return holds_only(directory, ours)


def check_output_dir(directory: str | Path) -> None:
    """GptlabError unless save_tokenizer() may write `directory`: it must be new, empty, or a
    previous tokenizer. Call it before training, so that a refusal costs no work."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise GptlabError(f"{directory} is a file; choose another output directory with --out")
    if directory.exists() and not _is_replaceable(directory):
        raise GptlabError(
            f"{directory} already holds files that are not a valid tokenizer's; choose another --out or empty it"
        )


def save_tokenizer(tokenizer: Tokenizer, directory: str | Path) -> None:
    """Write `tokenizer` as the directory `directory`, all at once: it is written beside it and
    renamed into place, so a failure leaves nothing half-written. A previous tokenizer there is
    replaced; a directory holding anything else is refused (see check_output_dir)."""
    check_output_dir(directory)
    with staged_directory(directory) as staging:
        tokenizer.save(staging)

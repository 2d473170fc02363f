"""Reading training text from files: the one place that decides what counts as a usable corpus.

Rules (also in `gptlab tokenizer train --help`):
- a path may be a file or a directory; directories are searched recursively for `*.txt` files,
  taken in sorted order so that the same inputs always give the same corpus;
- a file holding NUL bytes, or mostly undecodable bytes, is binary and refused;
- bytes that are not UTF-8 in an otherwise textual file are replaced by U+FFFD, with a warning
  naming the file and the offset of the first bad byte;
- a leading UTF-8 byte-order mark is dropped: it marks the encoding, it is not text;
- no text at all is an error.
"""

from __future__ import annotations

import warnings
from pathlib import Path

from gptlab.errors import GptlabError

# More undecodable bytes than this fraction means the file is not text in any useful sense.
_MAX_BAD_BYTE_FRACTION = 0.05
_BOM = "\ufeff"


def corpus_files(paths: list[str | Path]) -> list[Path]:
    """The text files that `paths` name: files as given, directories expanded to their `*.txt`
    files (recursively, sorted). Raises GptlabError for a path that does not exist."""
    if not paths:
        raise GptlabError("no corpus given; pass one or more text files or directories")
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*.txt") if p.is_file()))
        elif path.is_file():
            files.append(path)
        else:
            raise GptlabError(f"corpus path {path} does not exist; check the spelling or pass another file")
    return files


def read_text_file(path: Path) -> str:
    """The text of one corpus file, decoded as UTF-8 by the rules in this module's docstring."""
    data = path.read_bytes()
    if b"\0" in data:
        raise GptlabError(f"{path} looks like a binary file (it holds NUL bytes); pass plain text files only")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        text = data.decode("utf-8", errors="replace")
        bad_chars = text.count("\ufffd")
        if bad_chars > _MAX_BAD_BYTE_FRACTION * len(data):
            raise GptlabError(
                f"{path} is not UTF-8 text ({bad_chars} undecodable bytes); convert it to UTF-8 or leave it out"
            ) from None
        warnings.warn(
            f"{path} is not valid UTF-8 (first bad byte at offset {error.start}); "
            f"{bad_chars} undecodable byte(s) were replaced by U+FFFD",
            stacklevel=2,
        )
    return text.removeprefix(_BOM)


def read_corpus(paths: list[str | Path], max_chars: int | None = None) -> list[str]:
    """One string per corpus file, in a fixed order, at most `max_chars` characters in total.

    Raises GptlabError for a missing path, a binary file, or a corpus without any text.
    """
    if max_chars is not None and max_chars <= 0:
        raise GptlabError(f"max_chars must be positive, got {max_chars}")
    files = corpus_files(paths)
    documents: list[str] = []
    remaining = max_chars
    for path in files:
        if remaining == 0:
            break
        text = read_text_file(path)
        if remaining is not None:
            text = text[:remaining]
            remaining -= len(text)
        if text:
            documents.append(text)
    if not documents:
        names = ", ".join(str(p) for p in paths)
        raise GptlabError(f"the corpus ({names}) holds no text; pass non-empty .txt files")
    return documents

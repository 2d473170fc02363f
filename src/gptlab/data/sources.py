"""Where `prepare` gets its text: the source files, read as a stream of bounded pieces.

A source is either a text file (the whole file is one document) or, given a `jsonl_field`, a
JSONL file (each non-blank line is a JSON object and its `jsonl_field` string is one document,
read and tokenized whole; small documents are grouped into pieces of work).

Text files are read in blocks of about `piece_bytes`, so a file of any size costs memory
bounded by the block size, given safe points to cut at. A block is cut only at a *safe point*:
right after a newline that is followed by a visible (non-whitespace) character. For a
tokenizer that pre-splits text with the GPT-4 pattern no chunk crosses such a point (a chunk
ends at the last newline of a run and never joins a newline to the character after it), so
tokenizing the pieces one by one gives exactly the ids of the whole file. Tokenizers without that guarantee get whole documents (`split=False`), and a
file without safe points (one long line) is one piece: their memory grows with the document.

UTF-8 rules are those of `gptlab.tokenizers.corpus.read_text_file`, applied block by block:
NUL bytes mean a binary file (refused), undecodable bytes become U+FFFD with one warning per
file (too many of them: refused), and a leading byte-order mark is dropped.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from gptlab.errors import GptlabError
from gptlab.tokenizers.base import Tokenizer
from gptlab.tokenizers.bpe import GPT4_PATTERN, BPETokenizer
from gptlab.tokenizers.char import CharTokenizer
from gptlab.tokenizers.corpus import corpus_files
from gptlab.tokenizers.tiktoken_adapter import CONFIG_FILE as TIKTOKEN_CONFIG_FILE
from gptlab.tokenizers.tiktoken_adapter import TiktokenTokenizer

DEFAULT_PIECE_BYTES = 2**20  # 1 MiB: the ids of a piece cost ~40x its size in Python lists while tokenized
# More undecodable bytes than this fraction of a file means it is not text (as in corpus.py).
_MAX_BAD_BYTE_FRACTION = 0.05
_BOM = "\ufeff"


@dataclass(frozen=True)
class Segment:
    """A stretch of one document's text; the corpus is the segments in order."""

    text: str
    source: int  # index of its file in the source list
    ends_document: bool  # an <EOS> follows it
    text_bytes: int  # UTF-8 bytes of `text`
    file_bytes: int  # bytes of the file it consumed, for progress


# ---- which files ------------------------------------------------------------------------
def source_files(paths: list[str | Path], jsonl_field: str | None = None) -> list[Path]:
    """The files `paths` name, in a fixed order: files as given, directories expanded
    recursively (sorted) to their `*.txt` files, or their `*.jsonl` files with `jsonl_field`."""
    if jsonl_field is None:
        return corpus_files(paths)
    if not paths:
        raise GptlabError("no corpus given; pass one or more JSONL files or directories")
    files: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            files.extend(sorted(p for p in path.rglob("*.jsonl") if p.is_file()))
        elif path.is_file():
            files.append(path)
        else:
            raise GptlabError(f"corpus path {path} does not exist; check the spelling or pass another file")
    return files


def read_segments(
    files: list[Path], jsonl_field: str | None, piece_bytes: int = DEFAULT_PIECE_BYTES, split: bool = True
) -> Iterator[Segment]:
    """Every document of `files` as segments, in order (see the module docstring)."""
    for index, path in enumerate(files):
        if jsonl_field is None:
            yield from text_file_segments(path, index, piece_bytes, split)
        else:
            yield from jsonl_segments(path, index, jsonl_field)


def group_segments(segments: Iterable[Segment], max_bytes: int) -> Iterator[list[Segment]]:
    """Consecutive segments gathered into lists of about `max_bytes` of text: units of work
    big enough that handing them to a worker process costs little."""
    group: list[Segment] = []
    size = 0
    for segment in segments:
        group.append(segment)
        size += segment.text_bytes
        if size >= max_bytes:
            yield group
            group, size = [], 0
    if group:
        yield group


# ---- text files -------------------------------------------------------------------------
def text_file_segments(path: Path, source: int, piece_bytes: int, split: bool = True) -> Iterator[Segment]:
    """One text file as segments of about `piece_bytes` (one segment when not `split`);
    the last one ends the document unless the file holds no text."""
    decoder = _Utf8Decoder(path)
    held: list[bytes] = []  # bytes read but not yet emitted
    total_text = 0
    with open(path, "rb") as file:
        while block := file.read(piece_bytes):
            # Only the new block is searched, so a long stretch without safe points costs linear time.
            cut = safe_cut(block) if split else 0
            if not cut:
                held.append(block)
                continue
            piece = decoder.decode(b"".join([*held, block[:cut]]))
            held = [block[cut:]]
            total_text += piece.text_bytes
            yield Segment(piece.text, source, False, piece.text_bytes, piece.file_bytes)
    last = decoder.decode(b"".join(held))
    decoder.finish()
    total_text += last.text_bytes
    yield Segment(last.text, source, total_text > 0, last.text_bytes, last.file_bytes)


def safe_cut(data: bytes) -> int:
    """The index just after the last newline in `data` that a visible character follows
    (within `data`), or 0 if there is none."""
    end = len(data)
    while (newline := data.rfind(b"\n", 0, end)) >= 0:
        if _starts_with_visible_char(data[newline + 1 : newline + 5]):
            return newline + 1
        end = newline
    return 0


def _starts_with_visible_char(data: bytes) -> bool:
    if not data:
        return False
    if data[0] < 0x80:
        return 0x21 <= data[0] <= 0x7E
    for length in (2, 3, 4):
        try:
            return not data[:length].decode("utf-8").isspace()
        except UnicodeDecodeError:
            continue
    return False  # invalid or cut short: not a point to rely on


@dataclass(frozen=True)
class _Piece:
    text: str
    text_bytes: int
    file_bytes: int


class _Utf8Decoder:
    """Decodes one file's consecutive pieces (each ending at a newline or the file's end, so
    never inside a character) by the UTF-8 rules of the module docstring."""

    def __init__(self, path: Path):
        self.path = path
        self.size = path.stat().st_size
        self.offset = 0  # file offset of the next piece
        self.bad_chars = 0
        self.first_bad_offset: int | None = None

    def decode(self, data: bytes) -> _Piece:
        if b"\0" in data:
            raise GptlabError(f"{self.path} looks like a binary file (it holds NUL bytes); pass plain text files only")
        try:
            text, text_bytes = data.decode("utf-8"), len(data)
        except UnicodeDecodeError as error:
            if self.first_bad_offset is None:
                self.first_bad_offset = self.offset + error.start
            text = data.decode("utf-8", errors="replace")
            text_bytes = len(text.encode("utf-8"))
            self.bad_chars += text.count("\ufffd")
            if self.bad_chars > _MAX_BAD_BYTE_FRACTION * self.size:
                raise GptlabError(
                    f"{self.path} is not UTF-8 text (over {self.bad_chars} undecodable bytes); "
                    "convert it to UTF-8 or leave it out"
                ) from None
        if self.offset == 0 and text.startswith(_BOM):
            text, text_bytes = text[1:], text_bytes - len(_BOM.encode("utf-8"))
        self.offset += len(data)
        return _Piece(text, text_bytes, len(data))

    def finish(self) -> None:
        """Warn once for the whole file if any bytes were replaced."""
        if self.first_bad_offset is not None:
            warnings.warn(
                f"{self.path} is not valid UTF-8 (first bad byte at offset {self.first_bad_offset}); "
                f"{self.bad_chars} undecodable byte(s) were replaced by U+FFFD",
                stacklevel=2,
            )


# ---- JSONL files ------------------------------------------------------------------------
def jsonl_segments(path: Path, source: int, field: str) -> Iterator[Segment]:
    """One segment per non-blank line of a JSONL file: the string in its `field`. A line that
    is not a JSON object with that string field is an error naming the file and line."""
    with open(path, "rb") as file:
        for line_number, line in enumerate(file, start=1):
            where = f"{path}:{line_number}"
            if not line.strip():
                continue
            if b"\0" in line:
                raise GptlabError(f"{where} holds NUL bytes, so {path} is not JSONL; pass JSONL text files only")
            try:
                record = json.loads(line)
            except UnicodeDecodeError:
                raise GptlabError(f"{where} is not UTF-8; convert {path} to UTF-8") from None
            except ValueError as error:
                raise GptlabError(f"{where} is not valid JSON ({error}); fix or remove that line") from None
            except RecursionError:  # json recurses once per level of nesting
                raise GptlabError(f"{where} is nested too deeply to read as JSON; fix or remove that line") from None
            text = record.get(field) if isinstance(record, dict) else None
            if not isinstance(text, str):
                raise GptlabError(
                    f"{where} has no string field {field!r}; fix that line or pass the right --jsonl_field"
                )
            text_bytes = len(text.encode("utf-8", errors="surrogatepass"))
            # An empty document is skipped, as an empty text file is: no lone <EOS>.
            yield Segment(text, source, bool(text), text_bytes, len(line))


# ---- which tokenizers may be fed pieces -------------------------------------------------
def can_split(tokenizer: Tokenizer) -> bool:
    """Whether cutting a document at safe points leaves its ids unchanged for `tokenizer`:
    true for the char kind and for BPE kinds that pre-split with the GPT-4 (cl100k) pattern.
    Others (the GPT-2 and o200k patterns join a newline run to what follows; sentencepiece
    marks the start of every call) are fed whole documents."""
    if isinstance(tokenizer, CharTokenizer):
        return True
    if isinstance(tokenizer, BPETokenizer):
        return tokenizer.pattern == GPT4_PATTERN
    if isinstance(tokenizer, TiktokenTokenizer):
        config = json.loads(tokenizer.to_files()[TIKTOKEN_CONFIG_FILE])
        return config.get("pattern") == GPT4_PATTERN
    return False

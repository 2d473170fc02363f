"""gptlab's own tokenizer (kind "default"): byte-level BPE with a regex pre-split.

Ids: 0..255 are the raw bytes; 256 + i is the token made by merge i (merges in rank order);
the special tokens <PAD> <UNK> <BOS> <EOS> come next, then any added special tokens (the chat
markers, tokenizers/chat.py). vocab_size counts them all.

Text is first split into chunks by a regex (GPT-4's cl100k pattern by default, GPT-2's as an
option); each chunk's UTF-8 bytes are then merged, always joining the adjacent pair whose
joined bytes form the lowest-id token, as tiktoken does. `encode` runs tiktoken's engine on
our ranks; `encode_reference` is the same algorithm in pure Python and gives identical ids
(except where the two regex engines' Unicode tables disagree: code points assigned only in the
newest Unicode versions may count as letters for one and not the other).

Surrogates: UTF-8 cannot hold them, so (as tiktoken does) a surrogate pair written as two code
points is encoded as the character it stands for and a lone surrogate as U+FFFD. Every other
string survives `decode(encode(s)) == s`; decoding bytes that are not valid UTF-8 (a partial
character) gives U+FFFD in their place.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path

import regex
import tiktoken

from gptlab.errors import GptlabError
from gptlab.files import write_atomic
from gptlab.tokenizers import byte_level
from gptlab.tokenizers.base import (
    SPECIAL_TOKENS,
    AllowedSpecial,
    Tokenizer,
    allowed_set,
    check_added_specials,
    engine_errors,
)
from gptlab.tokenizers.bpe_train import count_chunks, learn_merges
from gptlab.tokenizers.pattern_safety import check_pattern_safety

GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
GPT4_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+"""
    r"""|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
PATTERNS = {"gpt4": GPT4_PATTERN, "gpt2": GPT2_PATTERN}
FORMAT_VERSION = 1
CONFIG_FILE, VOCAB_FILE, MERGES_FILE = "tokenizer_config.json", "vocab.json", "merges.txt"
MAX_VOCAB_SIZE = 0x110000  # the trainer holds a token id as one code point, chr(id)
CHUNK_CACHE_SIZE = 1 << 16  # recently seen chunks the reference encoder remembers


def resolve_pattern(pattern: str) -> str:
    """ "gpt4" | "gpt2" | a regex -> the regex; GptlabError if it does not compile or can take
    exponential time (pattern_safety.py)."""
    pattern = PATTERNS.get(pattern, pattern)
    try:
        regex.compile(pattern)
    except regex.error as error:
        raise GptlabError(
            f"split pattern {pattern!r} is not a valid regex ({error}); use 'gpt4', 'gpt2' or fix it"
        ) from None
    check_pattern_safety(pattern)
    return pattern


# One of each kind of character, to catch a split pattern that would drop some of them.
PATTERN_PROBE = "Hello, World!  It's 2024:\tcafé, 中文 😀 e\u0301\r\n_-+=/\\ \x00\u3000end\n\n"


def check_new_pattern(pattern: str) -> str:
    """resolve_pattern, and for a pattern about to be trained with, what encoding will need of it:
    tiktoken's engine (which encodes) compiles it, it never matches empty text, and its pieces
    cover a sample of every kind of character (a pattern that skips characters loses text).
    Loading a saved tokenizer checks only that its pattern compiles."""
    pattern = resolve_pattern(pattern)
    if pattern in PATTERNS.values():
        return pattern
    fix = "use 'gpt4', 'gpt2' or fix it"
    try:
        tiktoken.Encoding(
            "probe", pat_str=pattern, mergeable_ranks={bytes([b]): b for b in range(256)}, special_tokens={}
        )
    except ValueError as error:
        raise GptlabError(
            f"split pattern {pattern!r} does not compile in tiktoken, which encodes ({error}); {fix}"
        ) from None
    pieces = [match.group() for match in regex.finditer(pattern, PATTERN_PROBE)]
    if "" in pieces:
        raise GptlabError(f"split pattern {pattern!r} can match empty text, which cannot be a token; {fix}")
    if "".join(pieces) != PATTERN_PROBE:
        raise GptlabError(
            f"split pattern {pattern!r} leaves some characters out of every piece, so text would be lost; {fix}"
        )
    return pattern


class BPETokenizer(Tokenizer):
    """Byte-level BPE: `train` it on text, or rebuild it from merges, files or a .tiktoken file."""

    kind = "default"

    def __init__(self, merges: list[tuple[int, int]], pattern: str = "gpt4", added_special: Sequence[str] = ()):
        self.pattern = resolve_pattern(pattern)
        self._split = regex.compile(self.pattern)
        self._merges = [(int(a), int(b)) for a, b in merges]
        self._token_bytes = [bytes([b]) for b in range(256)]
        for rank, (a, b) in enumerate(self._merges):
            new_id = 256 + rank
            if not (0 <= a < new_id and 0 <= b < new_id):
                raise GptlabError(
                    f"merge {rank} ({a}, {b}) uses a token that does not exist yet; re-train the tokenizer"
                )
            self._token_bytes.append(self._token_bytes[a] + self._token_bytes[b])
        # Token bytes -> id; the ranks tiktoken merges by (lower id = earlier merge).
        self._ranks = {token: i for i, token in enumerate(self._token_bytes)}
        if len(self._ranks) != len(self._token_bytes):
            raise GptlabError("two merges make the same token; re-train the tokenizer")
        self._added = check_added_specials(tuple(added_special))
        specials = SPECIAL_TOKENS + self._added
        first_special = len(self._token_bytes)
        self._special_tokens = {token: first_special + i for i, token in enumerate(specials)}
        self._id_bytes = self._token_bytes + [token.encode("utf-8") for token in specials]
        # Longest first, so that a special token that prefixes another never wins over it.
        by_length = sorted(specials, key=len, reverse=True)
        self._special_split = regex.compile("|".join(regex.escape(token) for token in by_length))
        self._encode_chunk = lru_cache(maxsize=CHUNK_CACHE_SIZE)(self._bpe_chunk)
        self._engine: tiktoken.Encoding | None = None

    # ---- training ------------------------------------------------------------------------
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, pattern: str = "gpt4", progress: bool = True) -> BPETokenizer:
        """Learn a tokenizer of exactly `vocab_size` ids (the 4 special tokens included) from
        `texts`, an iterable of documents. If the corpus runs out of pairs occurring twice first,
        warn and return the smaller tokenizer."""
        smallest = 256 + len(SPECIAL_TOKENS)
        if vocab_size < smallest:
            raise GptlabError(
                f"vocab_size {vocab_size} is too small: use at least {smallest} (256 bytes + 4 special tokens)"
            )
        if vocab_size > MAX_VOCAB_SIZE:
            raise GptlabError(f"vocab_size {vocab_size} is too large: use at most {MAX_VOCAB_SIZE}")
        pattern = check_new_pattern(pattern)
        chunk_counts = count_chunks(texts, regex.compile(pattern))
        if not chunk_counts:
            raise GptlabError("the training corpus is empty; give the tokenizer some text")
        merges = learn_merges(chunk_counts, vocab_size - smallest, progress)
        tokenizer = cls(merges, pattern)
        if tokenizer.vocab_size < vocab_size:
            warnings.warn(
                f"the corpus is too small for vocab_size {vocab_size}: no pair occurs twice after "
                f"{len(merges)} merges, so the vocabulary has {tokenizer.vocab_size} ids",
                stacklevel=2,
            )
        return tokenizer

    # ---- the vocabulary --------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return len(self._id_bytes)

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._special_tokens)

    @property
    def added_special_tokens(self) -> tuple[str, ...]:
        return self._added

    def _with_added(self, added: tuple[str, ...]) -> BPETokenizer:
        return BPETokenizer(self._merges, self.pattern, added)

    @property
    def merges(self) -> list[tuple[int, int]]:
        """The merges (a, b) in rank order; merge i makes id 256 + i."""
        return list(self._merges)

    @property
    def n_merges(self) -> int:
        return len(self._merges)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes of one id (a special token's are its UTF-8 text)."""
        return self._id_bytes[self.check_ids([token_id])[0]]

    # ---- encoding and decoding ------------------------------------------------------------
    def encode(self, text: str, allowed_special: AllowedSpecial = ()) -> list[int]:
        """Ids of `text` through tiktoken's engine; identical to encode_reference()."""
        allowed = allowed_set(allowed_special, self._special_tokens)
        engine = self._tiktoken()
        with engine_errors(self.kind):
            if not allowed:
                return engine.encode_ordinary(text)
            return engine.encode(text, allowed_special=allowed, disallowed_special=())

    def encode_batch(
        self, texts: list[str], allowed_special: AllowedSpecial = (), num_threads: int = 8
    ) -> list[list[int]]:
        """encode() for many texts, run in tiktoken's threads."""
        allowed = allowed_set(allowed_special, self._special_tokens)
        engine = self._tiktoken()
        with engine_errors(self.kind):
            if not allowed:
                return engine.encode_ordinary_batch(texts, num_threads=num_threads)
            return engine.encode_batch(texts, num_threads=num_threads, allowed_special=allowed, disallowed_special=())

    def encode_reference(self, text: str, allowed_special: AllowedSpecial = ()) -> list[int]:
        """Ids of `text` in pure Python: split, then merge each chunk by lowest rank first."""
        allowed = allowed_set(allowed_special, self._special_tokens)
        text = byte_level.without_surrogates(text)
        ids: list[int] = []
        start = 0
        for match in self._special_split.finditer(text) if allowed else ():
            if match.group() in allowed:
                ids += self._encode_ordinary(text[start : match.start()])
                ids.append(self._special_tokens[match.group()])
                start = match.end()
        ids += self._encode_ordinary(text[start:])
        return ids

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; bytes that are not valid UTF-8 become U+FFFD."""
        id_bytes = self._id_bytes
        return b"".join([id_bytes[i] for i in self.check_ids(ids)]).decode("utf-8", errors="replace")

    def _encode_ordinary(self, text: str) -> list[int]:
        ids: list[int] = []
        for chunk in self._split.findall(text):
            ids += self._encode_chunk(chunk)
        return ids

    def _bpe_chunk(self, chunk: str) -> tuple[int, ...]:
        """One chunk's ids: repeatedly join the adjacent pair that makes the lowest-rank token."""
        data = chunk.encode("utf-8")
        ranks = self._ranks
        if data in ranks:  # a whole chunk that is a token is taken as is (tiktoken does too)
            return (ranks[data],)
        parts = [data[i : i + 1] for i in range(len(data))]
        while len(parts) > 1:
            best_rank, best_at = None, -1
            for at in range(len(parts) - 1):
                rank = ranks.get(parts[at] + parts[at + 1])
                if rank is not None and (best_rank is None or rank < best_rank):
                    best_rank, best_at = rank, at
            if best_rank is None:
                break
            parts[best_at : best_at + 2] = [parts[best_at] + parts[best_at + 1]]
        return tuple(ranks[part] for part in parts)

    def _tiktoken(self) -> tiktoken.Encoding:
        """tiktoken's engine fed our ranks, built on first use."""
        if self._engine is None:
            try:
                self._engine = tiktoken.Encoding(
                    name=f"gptlab-bpe-{len(self._ranks)}",
                    pat_str=self.pattern,
                    mergeable_ranks=self._ranks,
                    special_tokens=self._special_tokens,
                )
            except ValueError as error:  # tiktoken's regex engine knows less syntax than `regex`
                raise GptlabError(
                    f"tiktoken cannot compile the split pattern ({error}); use 'gpt4', 'gpt2' or a simpler regex"
                ) from None
        return self._engine

    # ---- files ----------------------------------------------------------------------------
    def to_files(self) -> dict[str, bytes]:
        """vocab.json + merges.txt (GPT-2 byte-level format) and tokenizer_config.json."""
        config = {
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "pattern": self.pattern,
            "special_tokens": self._special_tokens,
        }
        if self._added:  # only then, so that older tokenizers' files (and fingerprints) stay the same
            config["added_special_tokens"] = list(self._added)
        return {
            CONFIG_FILE: (json.dumps(config, indent=2) + "\n").encode("utf-8"),
            VOCAB_FILE: byte_level.write_vocab_json(self._token_bytes, self._special_tokens),
            MERGES_FILE: byte_level.write_merges_txt(self._token_bytes, self._merges),
        }

    @classmethod
    def from_files(cls, files: dict[str, bytes]) -> BPETokenizer:
        """Rebuild from to_files()'s output; GptlabError naming the file that is missing or wrong."""
        for name in (CONFIG_FILE, VOCAB_FILE, MERGES_FILE):
            if name not in files:
                raise GptlabError(f"tokenizer file {name} is missing; save the tokenizer again")
        config = _read_config(files[CONFIG_FILE])
        added = check_added_specials(config.get("added_special_tokens", []), f"{CONFIG_FILE}'s added_special_tokens")
        vocab = byte_level.read_vocab_json(files[VOCAB_FILE], set(SPECIAL_TOKENS + added))
        merges = []
        for rank, (left, right) in enumerate(byte_level.read_merges_txt(files[MERGES_FILE])):
            if vocab.get(left + right) != 256 + rank or left not in vocab or right not in vocab:
                raise GptlabError(f"merges.txt line {rank + 2} does not match vocab.json; save the tokenizer again")
            merges.append((vocab[left], vocab[right]))
        if len(vocab) != 256 + len(merges) or any(vocab.get(bytes([b])) != b for b in range(256)):
            raise GptlabError(
                "vocab.json does not hold exactly the 256 bytes and one token per merge; save the tokenizer again"
            )
        tokenizer = cls(merges, config["pattern"], added)
        if config["special_tokens"] != tokenizer._special_tokens:
            raise GptlabError(f"{CONFIG_FILE}: special token ids do not follow the merges; save the tokenizer again")
        return tokenizer

    def save_tiktoken(self, path: str | Path) -> None:
        """Write the ranks as a tiktoken .tiktoken file (special tokens are not part of it)."""
        write_atomic(path, byte_level.write_tiktoken(self._ranks))

    @classmethod
    def from_tiktoken(cls, path: str | Path, pattern: str = "gpt4") -> BPETokenizer:
        """Import a .tiktoken rank file. It has no merge list, so each token's merge is recovered:
        the two parts BPE ends with when it runs on the token's bytes using only lower ranks.
        Byte tokens get ids 0..255 and the others 256.. in rank order, which keeps every chunk
        split into the same tokens."""
        path = Path(path)
        if not path.is_file():
            raise GptlabError(f"tiktoken file {path} not found; give the path to a .tiktoken rank file")
        ranks = byte_level.read_tiktoken(path.read_bytes(), path.name)
        if any(bytes([b]) not in ranks for b in range(256)):
            raise GptlabError(f"{path.name} lacks some of the 256 single bytes; it is not a byte-level BPE")
        our_ids = {bytes([b]): b for b in range(256)}
        merges = []
        for token in sorted((t for t in ranks if len(t) > 1), key=ranks.__getitem__):
            parts = _merge_below(token, ranks, ranks[token])
            if len(parts) != 2:
                raise GptlabError(f"{path.name}: token {token!r} is not a merge of two lower-rank tokens")
            merges.append((our_ids[parts[0]], our_ids[parts[1]]))
            our_ids[token] = 255 + len(merges)
        return cls(merges, pattern)


def _merge_below(token: bytes, ranks: dict[bytes, int], limit: int) -> list[bytes]:
    """BPE on `token`'s bytes with only the tokens ranked below `limit`."""
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best_rank, best_at = limit, -1
        for at in range(len(parts) - 1):
            rank = ranks.get(parts[at] + parts[at + 1], limit)
            if rank < best_rank:
                best_rank, best_at = rank, at
        if best_at < 0:
            break
        parts[best_at : best_at + 2] = [parts[best_at] + parts[best_at + 1]]
    return parts


def _read_config(data: bytes) -> dict:
    """tokenizer_config.json, checked."""
    try:
        config = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise GptlabError(f"{CONFIG_FILE} is not valid JSON ({error}); save the tokenizer again") from None
    if not isinstance(config, dict) or config.get("kind") != BPETokenizer.kind:
        raise GptlabError(f"{CONFIG_FILE} is not a 'default' (BPE) tokenizer config; load it with its own kind")
    if config.get("format_version") != FORMAT_VERSION:
        raise GptlabError(
            f"{CONFIG_FILE} has format version {config.get('format_version')}, expected {FORMAT_VERSION}; save it again"
        )
    if not isinstance(config.get("pattern"), str) or not isinstance(config.get("special_tokens"), dict):
        raise GptlabError(f"{CONFIG_FILE} lacks 'pattern' or 'special_tokens'; save the tokenizer again")
    return config

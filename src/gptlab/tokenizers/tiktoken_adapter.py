"""OpenAI's published encodings (cl100k_base, o200k_base, gpt2 ...) as gptlab tokenizers.

The encoding's ids are kept as they are; our <PAD> <UNK> <BOS> <EOS> take the four ids right
after the encoding's highest id (then any added special tokens: the chat markers, tokenizers/chat.py),
and the encoding's own special tokens (`<|endoftext|>` ...)
stay usable through `allowed_special`. The rank file is embedded in `to_files()`, so a
checkpoint carries the whole encoding and never needs the network.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import tiktoken

from gptlab.errors import GptlabError
from gptlab.tokenizers.base import (
    SPECIAL_TOKENS,
    AllowedSpecial,
    Tokenizer,
    allowed_set,
    check_added_specials,
    engine_errors,
)
from gptlab.tokenizers.bpe import GPT4_PATTERN, resolve_pattern
from gptlab.tokenizers.byte_level import read_tiktoken, write_tiktoken
from gptlab.tokenizers.pattern_safety import check_pattern_safety

RANKS_FILE = "ranks.tiktoken"
CONFIG_FILE = "tiktoken_config.json"
FORMAT_VERSION = 1

# tiktoken's faster, equivalent spelling of GPT-2's pattern (r50k_base).
_R50K_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
_O200K_PATTERN = "|".join(
    [
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n/]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)

_ENDOFTEXT, _ENDOFPROMPT = "<|endoftext|>", "<|endofprompt|>"
_FIM = ("<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>")
# What a bare `.tiktoken` rank file does not say: the split pattern and special tokens of the
# encoding it belongs to, recognised by its file name (as in tiktoken_ext/openai_public.py).
KNOWN_ENCODINGS: dict[str, tuple[str, dict[str, int]]] = {
    "gpt2": (_R50K_PATTERN, {_ENDOFTEXT: 50256}),
    "r50k_base": (_R50K_PATTERN, {_ENDOFTEXT: 50256}),
    "p50k_base": (_R50K_PATTERN, {_ENDOFTEXT: 50256}),
    "cl100k_base": (
        GPT4_PATTERN,
        {_ENDOFTEXT: 100257, _FIM[0]: 100258, _FIM[1]: 100259, _FIM[2]: 100260, _ENDOFPROMPT: 100276},
    ),
    "o200k_base": (_O200K_PATTERN, {_ENDOFTEXT: 199999, _ENDOFPROMPT: 200018}),
}


class TiktokenTokenizer(Tokenizer):
    """A tiktoken encoding plus our four special tokens, encoded by tiktoken's native engine."""

    kind = "tiktoken"

    def __init__(
        self,
        name: str,
        ranks: dict[bytes, int],
        pattern: str,
        encoding_specials: dict[str, int],
        added_special: Sequence[str] = (),
    ):
        self.name = name
        self._ranks = ranks
        self._pattern = pattern
        self._encoding_specials = dict(encoding_specials)
        check_pattern_safety(pattern)  # also a pattern read from a tokenizer file or checkpoint
        first_free = max(max(ranks.values()), max(encoding_specials.values(), default=-1)) + 1
        self._added = check_added_specials(tuple(added_special))
        if set(self._added) & set(self._encoding_specials):
            raise GptlabError(f"an added special token of {name!r} is one of its own; save the tokenizer again")
        self._special = {token: first_free + i for i, token in enumerate(SPECIAL_TOKENS + self._added)}
        try:
            self._encoding = tiktoken.Encoding(
                name=f"gptlab-{name}",
                pat_str=pattern,
                mergeable_ranks=ranks,
                special_tokens={**encoding_specials, **self._special},
            )
        except ValueError as error:
            raise GptlabError(f"cannot build tiktoken encoding {name!r}: {error}; check the split pattern") from None

    # ---- construction ---------------------------------------------------------------------
    @classmethod
    def from_name(cls, name: str) -> TiktokenTokenizer:
        """A named encoding that tiktoken can obtain (from its cache, or by downloading it)."""
        if name not in tiktoken.list_encoding_names():
            known = ", ".join(tiktoken.list_encoding_names())
            raise GptlabError(f"unknown tiktoken encoding {name!r}; use one of {known} or a .tiktoken file path")
        try:
            encoding = tiktoken.get_encoding(name)
        except Exception as error:  # any download failure means the same to the user
            raise GptlabError(
                f"tiktoken encoding {name!r} is not available offline ({type(error).__name__}); "
                f"pass the path of a {name}.tiktoken rank file instead, or set TIKTOKEN_CACHE_DIR "
                f"to a directory holding tiktoken's cached copy"
            ) from None
        # tiktoken's documented way to extend an encoding reads these attributes.
        return cls(name, encoding._mergeable_ranks, encoding._pat_str, encoding._special_tokens)

    @classmethod
    def from_file(cls, path: str | Path, pattern: str | None = None) -> TiktokenTokenizer:
        """A local `.tiktoken` rank file. Its split pattern and special tokens come from
        KNOWN_ENCODINGS when the file is named after one (cl100k_base.tiktoken), otherwise the
        GPT-4 pattern and no special tokens; `pattern` (gpt4, gpt2 or a regex) overrides the split pattern."""
        path = Path(path)
        if not path.is_file():
            raise GptlabError(f"tiktoken rank file {path} not found; pass an existing .tiktoken file")
        ranks = read_tiktoken(path.read_bytes(), str(path))
        known_pattern, specials = KNOWN_ENCODINGS.get(path.stem, (GPT4_PATTERN, {}))
        return cls(path.stem, ranks, resolve_pattern(pattern) if pattern else known_pattern, specials)

    @classmethod
    def from_path_or_name(cls, path_or_name: str | Path, pattern: str | None = None) -> TiktokenTokenizer:
        """A `.tiktoken` file, a directory written by save(), or a named encoding."""
        path = Path(path_or_name)
        if path.is_dir():
            if (path / CONFIG_FILE).is_file():
                return cls.load(path)
            rank_files = sorted(path.glob("*.tiktoken"))
            if len(rank_files) != 1:
                raise GptlabError(f"{path} should hold exactly one .tiktoken file, found {len(rank_files)}")
            return cls.from_file(rank_files[0], pattern)
        if path.is_file():
            return cls.from_file(path, pattern)
        return cls.from_name(str(path_or_name))

    # ---- the Tokenizer protocol --------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return max(self._special.values()) + 1

    @property
    def added_special_tokens(self) -> tuple[str, ...]:
        return self._added

    def _with_added(self, added: tuple[str, ...]) -> TiktokenTokenizer:
        return TiktokenTokenizer(self.name, self._ranks, self._pattern, self._encoding_specials, added)

    @property
    def special_tokens(self) -> dict[str, int]:
        return {**self._encoding_specials, **self._special}

    def encode(self, text: str, allowed_special: AllowedSpecial = ()) -> list[int]:
        allowed = allowed_set(allowed_special, self.special_tokens)
        with engine_errors(self.kind):
            return self._encoding.encode(text, allowed_special=allowed, disallowed_special=())

    def encode_batch(
        self, texts: list[str], allowed_special: AllowedSpecial = (), num_threads: int = 8
    ) -> list[list[int]]:
        allowed = allowed_set(allowed_special, self.special_tokens)
        with engine_errors(self.kind):
            return self._encoding.encode_batch(
                texts, num_threads=num_threads, allowed_special=allowed, disallowed_special=()
            )

    def decode(self, ids: Iterable[int]) -> str:
        ids = self.check_ids(ids)
        try:
            return self._encoding.decode(ids)
        except KeyError:
            # Some encodings leave gaps between ids (cl100k has none at 100261..100275).
            used = set(self._ranks.values()) | set(self.special_tokens.values())
            bad = next(i for i in ids if i not in used)
            raise GptlabError(f"token id {bad} is not used by the {self.name} encoding; check the ids") from None

    def to_files(self) -> dict[str, bytes]:
        config = {
            "format_version": FORMAT_VERSION,
            "kind": self.kind,
            "name": self.name,
            "pattern": self._pattern,
            "encoding_special_tokens": self._encoding_specials,
            "special_tokens": self._special,
        }
        if self._added:  # only then, so that older tokenizers' files (and fingerprints) stay the same
            config["added_special_tokens"] = list(self._added)
        return {CONFIG_FILE: json.dumps(config, indent=1).encode(), RANKS_FILE: write_tiktoken(self._ranks)}

    @classmethod
    def from_files(cls, files: dict[str, bytes]) -> TiktokenTokenizer:
        missing = [name for name in (CONFIG_FILE, RANKS_FILE) if name not in files]
        if missing:
            raise GptlabError(f"tiktoken tokenizer file {missing[0]} is missing; save the tokenizer again")
        try:
            config = json.loads(files[CONFIG_FILE])
            name, pattern, specials = config["name"], config["pattern"], config["encoding_special_tokens"]
            added = config.get("added_special_tokens", [])
        except (ValueError, KeyError, TypeError, AttributeError):
            raise GptlabError(f"{CONFIG_FILE} is corrupt; save the tiktoken tokenizer again") from None
        added = check_added_specials(added, f"{CONFIG_FILE}'s added_special_tokens")
        tokenizer = cls(name, read_tiktoken(files[RANKS_FILE], RANKS_FILE), pattern, specials, added)
        if config.get("special_tokens") != tokenizer._special:
            raise GptlabError(f"{CONFIG_FILE} does not match {RANKS_FILE}; save the tiktoken tokenizer again")
        return tokenizer

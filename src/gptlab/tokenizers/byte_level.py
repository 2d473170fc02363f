"""File formats of a byte-level BPE: GPT-2's vocab.json/merges.txt and tiktoken's .tiktoken ranks.

GPT-2 writes each token's bytes as printable text through a fixed byte -> character table
(`bytes_to_unicode`), so that vocab.json and merges.txt are plain UTF-8 with no spaces or
control characters inside a token. A .tiktoken file is one `base64(token bytes) rank` per line.
Both describe the same thing: the bytes of every token and the order in which they merge.
"""

from __future__ import annotations

import base64
import binascii
import json
from functools import lru_cache

from gptlab.errors import GptlabError

MERGES_HEADER = "#version: 0.2"


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table: each byte 0..255 -> one printable character.

    Printable Latin-1 bytes stand for themselves; the others (control characters, space,
    a few Latin-1 gaps) are moved, in order, to the characters from U+0100 on.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    moved = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + moved)
            moved += 1
    return table


@lru_cache(maxsize=1)
def unicode_to_bytes() -> dict[str, int]:
    """The inverse of bytes_to_unicode()."""
    return {char: b for b, char in bytes_to_unicode().items()}


def token_to_text(token: bytes) -> str:
    """A token's bytes as GPT-2 vocab.json text."""
    table = bytes_to_unicode()
    return "".join(table[b] for b in token)


def text_to_token(text: str, file_name: str) -> bytes:
    """GPT-2 vocab.json text back to a token's bytes; GptlabError if a character is not in the table."""
    table = unicode_to_bytes()
    try:
        return bytes(table[char] for char in text)
    except KeyError:
        raise GptlabError(
            f"{file_name}: token {text!r} is not GPT-2 byte-level text; re-save the tokenizer with gptlab"
        ) from None


# ---- vocab.json + merges.txt ----------------------------------------------------------------
def write_vocab_json(vocab: list[bytes], special_tokens: dict[str, int]) -> bytes:
    """vocab.json: byte-level token text -> id, the special tokens included as themselves."""
    entries = {token_to_text(token): i for i, token in enumerate(vocab)}
    entries.update(special_tokens)
    return json.dumps(entries, ensure_ascii=False, indent=0).encode("utf-8")


def write_merges_txt(vocab: list[bytes], merges: list[tuple[int, int]]) -> bytes:
    """merges.txt: the version line, then one `left right` merge per line in rank order."""
    lines = [MERGES_HEADER]
    lines += [f"{token_to_text(vocab[a])} {token_to_text(vocab[b])}" for a, b in merges]
    return ("\n".join(lines) + "\n").encode("utf-8")


def read_vocab_json(data: bytes, special_tokens: set[str]) -> dict[bytes, int]:
    """Token bytes -> id from vocab.json, the special tokens left out."""
    try:
        entries = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise GptlabError(f"vocab.json is not valid JSON ({error}); re-save the tokenizer") from None
    if not isinstance(entries, dict) or not all(isinstance(i, int) for i in entries.values()):
        raise GptlabError("vocab.json must map token text to integer ids; re-save the tokenizer")
    return {text_to_token(text, "vocab.json"): i for text, i in entries.items() if text not in special_tokens}


def read_merges_txt(data: bytes) -> list[tuple[bytes, bytes]]:
    """The merges in rank order, as pairs of token bytes."""
    try:
        lines = data.decode("utf-8").splitlines()
    except UnicodeDecodeError:
        raise GptlabError("merges.txt is not UTF-8 text; re-save the tokenizer") from None
    if lines and lines[0].startswith("#version"):
        lines = lines[1:]
    merges = []
    for number, line in enumerate(lines, start=2):
        parts = line.split(" ")
        if len(parts) != 2:
            raise GptlabError(f"merges.txt line {number} is not two tokens separated by a space; re-save the tokenizer")
        merges.append((text_to_token(parts[0], "merges.txt"), text_to_token(parts[1], "merges.txt")))
    return merges


# ---- .tiktoken ranks ---------------------------------------------------------------------------
def write_tiktoken(ranks: dict[bytes, int]) -> bytes:
    """tiktoken's rank file: `base64(token) rank` per line, by rank."""
    lines = [
        f"{base64.b64encode(token).decode('ascii')} {rank}"
        for token, rank in sorted(ranks.items(), key=lambda kv: kv[1])
    ]
    return ("\n".join(lines) + "\n").encode("ascii")


def read_tiktoken(data: bytes, file_name: str) -> dict[bytes, int]:
    """Token bytes -> rank from a .tiktoken file; GptlabError naming the file if it is malformed."""
    ranks: dict[bytes, int] = {}
    for number, line in enumerate(data.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise GptlabError(
                f"{file_name} line {number} is not `base64-token rank`; use a tiktoken rank file"
            ) from None
    if not ranks:
        raise GptlabError(f"{file_name} holds no tokens; use a tiktoken rank file")
    return ranks


# ---- text -> UTF-8 ---------------------------------------------------------------------------
def utf8_bytes(text: str) -> bytes:
    """`text` as UTF-8, with tiktoken's policy for surrogates, which UTF-8 cannot hold:
    a surrogate pair written as two code points becomes the character it stands for,
    and every lone surrogate becomes U+FFFD (the replacement character)."""
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return without_surrogates(text).encode("utf-8")


def without_surrogates(text: str) -> str:
    """`text` with surrogate pairs joined and lone surrogates replaced by U+FFFD (see utf8_bytes)."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")

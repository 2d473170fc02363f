"""Text files -> token shards on disk (+ meta.json), and finding or building them for a run.

A prepared directory holds `tokens_00000.bin`, `tokens_00001.bin`, ... (raw little-endian ids,
an <EOS> after each document) and `meta.json`, which says how to read them and which
tokenizer made them. `datasets.py` reads it back; `sources.py` reads the text and
`parallel.py` tokenizes it in worker processes.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

from gptlab.data.parallel import encode_groups
from gptlab.data.sources import DEFAULT_PIECE_BYTES, can_split, group_segments, read_segments, source_files
from gptlab.errors import GptlabError
from gptlab.files import holds_only, staged_directory
from gptlab.tokenizers.base import Tokenizer
from gptlab.tokenizers.corpus import corpus_files

FORMAT, VERSION = "gptlab-tokens", 1
META_NAME = "meta.json"
DEFAULT_SHARD_TOKENS = 100_000_000
UINT16_MAX_VOCAB = 65536

_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
_REQUIRED_META = {
    "tokenizer_kind": str,
    "tokenizer_fingerprint": str,
    "vocab_size": int,
    "dtype": str,
    "num_tokens": int,
    "num_bytes": int,
    "sources": list,
    "shards": list,
    "shard_lengths": list,
}


# ---- writing the shards -----------------------------------------------------------------
def token_dtype(vocab_size: int) -> str:
    """The smallest id type that holds every id of the vocabulary."""
    return "uint16" if vocab_size <= UINT16_MAX_VOCAB else "uint32"


def shard_name(index: int) -> str:
    return f"tokens_{index:05d}.bin"


class ShardWriter:
    """Appends token arrays to numbered shard files of at most `shard_tokens` ids each.

    Ids go straight to the open file, so memory holds only the array being appended; callers
    stream the corpus through `append` a piece at a time.
    """

    def __init__(self, directory: Path, dtype: str, shard_tokens: int = DEFAULT_SHARD_TOKENS):
        if shard_tokens <= 0:
            raise GptlabError(f"shard_tokens must be positive, got {shard_tokens}")
        self.directory, self.dtype, self.shard_tokens = directory, _DTYPES[dtype], shard_tokens
        self.shards: list[str] = []
        self.lengths: list[int] = []
        self._file = None

    def append(self, ids: np.ndarray) -> None:
        """Write `ids` (1-D, already range-checked) after everything written so far."""
        ids = np.ascontiguousarray(ids, dtype=self.dtype)
        while ids.size:
            if self._file is None or self.lengths[-1] == self.shard_tokens:
                self._open_next_shard()
            take = min(ids.size, self.shard_tokens - self.lengths[-1])
            self._file.write(ids[:take].tobytes())
            self.lengths[-1] += take
            ids = ids[take:]

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _open_next_shard(self) -> None:
        self.close()
        self.shards.append(shard_name(len(self.shards)))
        self.lengths.append(0)
        self._file = open(self.directory / self.shards[-1], "wb")

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def default_workers() -> int:
    """Worker processes `prepare` uses unless told: one per core, at most 4."""
    return min(4, os.cpu_count() or 1)


# ---- prepare ----------------------------------------------------------------------------
def prepare(
    sources: list[str | Path],
    tokenizer: Tokenizer,
    out_dir: str | Path,
    progress: bool = True,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    *,
    workers: int | None = None,
    jsonl_field: str | None = None,
    piece_bytes: int = DEFAULT_PIECE_BYTES,
) -> Path:
    """Tokenize the files and directories in `sources` into `out_dir` and return it.

    Text files are found and read by the corpus rules (gptlab.tokenizers.corpus: `*.txt` found
    recursively and sorted, invalid UTF-8 replaced with a warning, binary files refused) and
    each is one document followed by <EOS>. With `jsonl_field`, sources are JSONL files
    (directories give their `*.jsonl` files) and each line's `jsonl_field` string is a document.

    Text is read in pieces of about `piece_bytes` and tokenized by `workers` processes
    (default: default_workers(); a corpus of one piece is done in this process), and the ids are
    the same whatever the worker count. Memory is bounded by the piece size, not the corpus size,
    as long as the text has line breaks (pieces are cut after them) and the tokenizer splits with
    the GPT-4 pattern; otherwise each document (file or JSONL record) is read whole (sources.py).
    The directory is built beside `out_dir` and renamed into place only when complete, so a
    failure leaves nothing half-written; an existing prepared directory at `out_dir` is replaced.
    """
    _check_options(shard_tokens, workers, jsonl_field, piece_bytes)
    out_dir = Path(out_dir)
    files = source_files(sources, jsonl_field)
    _check_replaceable(out_dir)
    with staged_directory(out_dir) as build_dir:
        meta = _write_shards(
            files, tokenizer, build_dir, progress, shard_tokens, workers or default_workers(), jsonl_field, piece_bytes
        )
        (build_dir / META_NAME).write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
    return out_dir


def _check_options(shard_tokens: int, workers: int | None, jsonl_field: str | None, piece_bytes: int) -> None:
    if shard_tokens <= 0:
        raise GptlabError(f"shard_tokens must be positive, got {shard_tokens}; pass e.g. --shard_tokens 100000000")
    if workers is not None and workers <= 0:
        raise GptlabError(f"workers must be at least 1, got {workers}; pass e.g. --workers {default_workers()}")
    if jsonl_field is not None and not jsonl_field:
        raise GptlabError("jsonl_field is empty; name the JSON field that holds each document's text, e.g. text")
    if piece_bytes <= 0:
        raise GptlabError(f"piece_bytes must be positive, got {piece_bytes}")


def _write_shards(
    files: list[Path],
    tokenizer: Tokenizer,
    build_dir: Path,
    progress: bool,
    shard_tokens: int,
    workers: int,
    jsonl_field: str | None,
    piece_bytes: int,
) -> dict[str, Any]:
    dtype = token_dtype(tokenizer.vocab_size)
    sources: list[dict[str, Any]] = []
    for path in files:
        stat = path.stat()  # before reading: a file changed meanwhile makes the cache stale, not wrong
        counts = {"bytes": 0, "tokens": 0, "documents": 0}  # filled in as its pieces are tokenized
        sources.append({"path": str(path.resolve()), **counts, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns})
    total_size = sum(s["size"] for s in sources)
    if total_size <= piece_bytes:
        workers = 1  # a single piece of work: starting processes would cost more than they save
    segments = read_segments(files, jsonl_field, piece_bytes, split=can_split(tokenizer))
    with (
        ShardWriter(build_dir, dtype, shard_tokens) as writer,
        tqdm(total=total_size, unit="B", unit_scale=True, desc="prepare", disable=not progress) as bar,
    ):
        for group, ids, counts in encode_groups(tokenizer, group_segments(segments, piece_bytes), dtype, workers):
            writer.append(ids)
            for segment, count in zip(group, counts):
                source = sources[segment.source]
                source["bytes"] += segment.text_bytes
                source["tokens"] += count
                source["documents"] += segment.ends_document
            bar.update(sum(segment.file_bytes for segment in group))
    num_tokens = sum(writer.lengths)
    if num_tokens == 0:
        kind, suffix = ("JSONL documents", ".jsonl") if jsonl_field else ("text", ".txt")
        where = ", ".join(str(p) for p in files) if files else f"the given directories (no {suffix} files)"
        raise GptlabError(f"no {kind} found in {where}; pass non-empty files")
    return {
        "format": FORMAT,
        "version": VERSION,
        "tokenizer_kind": tokenizer.kind,
        "tokenizer_fingerprint": tokenizer.fingerprint(),
        "vocab_size": tokenizer.vocab_size,
        "dtype": dtype,
        "num_tokens": num_tokens,
        "num_bytes": sum(s["bytes"] for s in sources),
        "jsonl_field": jsonl_field,
        "sources": sources,
        "shards": writer.shards,
        "shard_lengths": writer.lengths,
    }


def _check_replaceable(out_dir: Path) -> None:
    """Refuse to replace anything but an empty directory or an earlier prepared one: our
    meta.json and shards, nothing else (never a user's files)."""
    if out_dir.exists() and not (out_dir.is_dir() and holds_only(out_dir, _prepared_files(out_dir))):
        raise GptlabError(f"{out_dir} already exists and is not prepared data; choose another output directory")


def _prepared_files(directory: Path) -> set[str]:
    """The names of the files `directory` holds as prepared data: meta.json and the shards it
    lists, or none when its meta.json is missing or not ours."""
    try:
        meta = json.loads((directory / META_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return set()
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or not isinstance(meta.get("shards"), list):
        return set()
    return {META_NAME, *map(str, meta["shards"])}


# ---- reading meta.json back -------------------------------------------------------------
def read_meta(prepared_dir: str | Path) -> dict[str, Any]:
    """The checked meta.json of a prepared directory; GptlabError when it or a shard is missing,
    corrupt or truncated."""
    prepared_dir = Path(prepared_dir)
    meta_path = prepared_dir / META_NAME
    if not prepared_dir.is_dir():
        raise GptlabError(f"prepared data directory {prepared_dir} not found; run `gptlab prepare` first")
    if not meta_path.is_file():
        raise GptlabError(f"{prepared_dir} has no {META_NAME}, so it is not prepared data; prepare it again")
    redo = f"delete {prepared_dir} and prepare the data again"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):
        raise GptlabError(f"{meta_path} is not valid JSON; {redo}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or meta.get("version") != VERSION:
        raise GptlabError(f"{meta_path} is not {FORMAT} version {VERSION} metadata; {redo}")
    for key, kind in _REQUIRED_META.items():
        if not isinstance(meta.get(key), kind):
            raise GptlabError(f"{meta_path} lacks a valid {key!r}; {redo}")
    shards_ok = len(meta["shards"]) == len(meta["shard_lengths"]) and all(
        isinstance(name, str) and Path(name).name == name and isinstance(length, int) and length > 0
        for name, length in zip(meta["shards"], meta["shard_lengths"])
    )
    if meta["dtype"] not in _DTYPES or not shards_ok:
        raise GptlabError(f"{meta_path} has an unknown dtype or a bad shard list; {redo}")
    if sum(meta["shard_lengths"]) != meta["num_tokens"]:
        raise GptlabError(f"{meta_path}: shard lengths do not add up to num_tokens; {redo}")
    itemsize = _DTYPES[meta["dtype"]].itemsize
    for name, length in zip(meta["shards"], meta["shard_lengths"]):
        shard = prepared_dir / name
        if not shard.is_file():
            raise GptlabError(f"shard {shard} is missing; {redo}")
        if shard.stat().st_size != length * itemsize:
            raise GptlabError(
                f"shard {shard} has {shard.stat().st_size} bytes, expected {length * itemsize} (truncated?); {redo}"
            )
    return meta


def numpy_dtype(meta: dict[str, Any]) -> np.dtype:
    """The numpy dtype of the shards described by `meta`."""
    return _DTYPES[meta["dtype"]]


# ---- resolve_data: prepared data, or text prepared on the fly and cached -----------------
def resolve_data(path: str | Path, tokenizer: Tokenizer, progress: bool = True, workers: int | None = None) -> Path:
    """A prepared directory for `path`, encoded by `tokenizer`.

    `path` is either prepared data (a directory with meta.json, whose tokenizer must match) or
    raw text (a file, or a directory of .txt files). Raw text is prepared on the first call and
    cached next to it as `<path>.gptlab-<fingerprint>/`; later calls reuse that cache while the
    source files (list, sizes, mtimes) are unchanged, and re-prepare it otherwise. When the
    directory next to the data is not writable, the cache goes under ~/.cache/gptlab/data/
    ($XDG_CACHE_HOME/gptlab/data/ when that is set).

    Safe under concurrent processes (the ranks of one torchrun job): one prepares the cache
    while holding a lock beside it, the others wait and then use its result.
    """
    path = Path(path)
    if not path.exists():
        raise GptlabError(f"data path {path} not found; pass a text file, a directory of .txt files or prepared data")
    if path.is_dir() and _looks_prepared(path):
        meta = read_meta(path)
        _check_tokenizer(path, meta, tokenizer)
        return path
    fingerprint = tokenizer.fingerprint()
    source = path.resolve()  # so that "." or "data/" still has a name to put the cache beside
    candidates = [source.parent / f"{source.name}.gptlab-{fingerprint}", _user_cache_dir(source, fingerprint)]
    files = corpus_files([path])
    for cache in candidates:
        if _is_fresh(cache, files, fingerprint):
            return cache
    for cache in candidates:
        if _is_writable(cache.parent):
            with _exclusive_lock(cache):
                if _is_fresh(cache, files, fingerprint):  # prepared by another process while this one waited
                    return cache
                return prepare([path], tokenizer, cache, progress=progress, workers=workers)
    raise GptlabError(
        f"cannot write a token cache beside {path} nor under {candidates[-1].parent}; "
        "prepare it with `gptlab prepare` into a writable directory"
    )


def _looks_prepared(directory: Path) -> bool:
    return (directory / META_NAME).exists() or any(directory.glob("tokens_*.bin"))


def _check_tokenizer(prepared_dir: Path, meta: dict[str, Any], tokenizer: Tokenizer) -> None:
    if meta["tokenizer_fingerprint"] != tokenizer.fingerprint():
        raise GptlabError(
            f"{prepared_dir} was prepared with another tokenizer ({meta['tokenizer_kind']} "
            f"{meta['tokenizer_fingerprint']}, this one is {tokenizer.kind} {tokenizer.fingerprint()}); "
            "prepare the text again with this tokenizer, or pass the raw text"
        )


def _is_fresh(cache: Path, files: list[Path], fingerprint: str) -> bool:
    """Whether `cache` holds intact data from exactly these files, as they are now, with this tokenizer."""
    try:
        meta = read_meta(cache)
    except GptlabError:
        return False
    recorded = [
        (s.get("path"), s.get("size"), s.get("mtime_ns")) if isinstance(s, dict) else s for s in meta["sources"]
    ]
    current = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return meta["tokenizer_fingerprint"] == fingerprint and recorded == current


def _user_cache_dir(source: Path, fingerprint: str) -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gptlab" / "data"
    # Different data with the same file name must not share a cache.
    where = hashlib.sha256(str(source).encode()).hexdigest()[:12]
    return root / f"{source.name}-{where}.gptlab-{fingerprint}"


def _is_writable(directory: Path) -> bool:
    try:
        directory.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=directory).close()
    except OSError:
        return False
    return True


@contextmanager
def _exclusive_lock(target: Path) -> Iterator[None]:
    """Hold an exclusive lock on a hidden file beside `target` (released if the process dies),
    and remove that file when done, so nothing is left beside the user's text.

    The holder unlinks the file before unlocking; a process that was waiting on it then finds
    the path gone or naming another file, and locks afresh, so two processes never both think
    they hold the lock. Without fcntl (Windows) there is no lock, and a race only costs
    duplicated work: each process still renames a complete directory into place."""
    if fcntl is None:
        yield
        return
    lock_path = target.with_name(f".{target.name}.lock")
    while True:
        lock_file = open(lock_path, "a")  # noqa: SIM115 - held open past this loop, closed in finally
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            if _same_file(lock_file, lock_path):
                break
        except BaseException:
            lock_file.close()
            raise
        lock_file.close()  # the file this process waited on was removed by its holder: try again
    try:
        yield
    finally:
        lock_path.unlink(missing_ok=True)
        lock_file.close()  # closing releases the lock


def _same_file(file: Any, path: Path) -> bool:
    """Whether the open `file` is still the one at `path`."""
    try:
        return os.path.samestat(os.fstat(file.fileno()), os.stat(path))
    except FileNotFoundError:
        return False

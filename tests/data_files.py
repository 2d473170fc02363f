"""The data the tests read: shipped in the repository's data/ folder (source and licence in
data/README.md), so a fresh clone with nothing beside it runs every test."""

from __future__ import annotations

import hashlib
from functools import cache
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "data"
SHAKESPEARE_TRAIN = DATA / "shakespeare" / "train.txt"
SHAKESPEARE_VAL = DATA / "shakespeare" / "val.txt"
# The hash tiktoken itself checks when it downloads cl100k_base.
CL100K_SHA256 = "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7"


def read_text(path: Path, limit: int | None = None) -> str:
    """The first `limit` characters of a shipped text file."""
    return path.read_text(encoding="utf-8")[:limit]


@cache
def cl100k_file() -> Path:
    """tiktoken's cl100k_base rank file, verified: a corrupted copy fails every test that reads it."""
    path = DATA / "tiktoken" / "cl100k_base.tiktoken"
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert digest == CL100K_SHA256, f"{path} is not tiktoken's cl100k_base (sha256 {digest})"
    return path


TOY_DATA = Path(__file__).resolve().parents[1] / "toy_data"


def write_toy_texts(folder: Path) -> Path:
    """train.txt (the first 20,000 characters of the toy corpus) and eval.txt (5,000 of its test
    text) written into `folder`, for end-to-end runs on tiny data; returns `folder`."""
    (folder / "train.txt").write_text(read_text(TOY_DATA / "tiny_sp_train.txt", 20_000), encoding="utf-8")
    (folder / "eval.txt").write_text(read_text(TOY_DATA / "tiny_sp_test.txt", 5_000), encoding="utf-8")
    return folder

"""Writing an output directory all at once: built beside its destination, renamed into place."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from gptlab import files
from gptlab.errors import GptlabError


def check_output_dir(out: str | Path, force: bool) -> Path:
    """`out` as a Path, or GptlabError if it is a file, or a non-empty directory without `force`.
    Call it before any slow work, so that a refusal costs nothing."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise GptlabError(f"{out} is a file; choose another --out directory")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise GptlabError(f"{out} already exists and is not empty; choose another --out or pass --force to replace it")
    return out


@contextmanager
def staged_directory(out: str | Path, force: bool = False) -> Iterator[Path]:
    """check_output_dir, then an empty directory to fill that replaces `out` only on success."""
    with files.staged_directory(check_output_dir(out, force)) as staging:
        yield staging

"""Writing an output directory all at once: built beside its destination, renamed into place."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

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
    """Yield an empty temporary directory beside `out`; on success it replaces `out`.

    On any error the temporary directory is removed and `out` is left exactly as it was.
    """
    out = check_output_dir(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
    retired = staging.with_suffix(".old")
    try:
        yield staging
        if out.exists():
            out.rename(retired)
        staging.rename(out)
    except BaseException:
        if retired.exists() and not out.exists():
            retired.rename(out)  # put the previous directory back
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(retired, ignore_errors=True)

"""Writing files and directories so that a crash or Ctrl-C never leaves one half-written."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path

from gptlab.errors import GptlabError


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed onto `path`, on error removed.

    The file is flushed to disk before the rename and the rename after it, so that after a power
    cut `path` holds the old contents or the new, never an empty or partial file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it owner-only; the file should read like any other
    try:
        yield Path(tmp)
        fsync_path(tmp)
        os.replace(tmp, path)
        fsync_path(path.parent)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_atomic(path: str | Path, data: bytes) -> None:
    """Write `data` to `path` atomically (temporary file + rename)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


@contextmanager
def staged_directory(out: str | Path) -> Iterator[Path]:
    """Yield an empty directory beside `out` to fill; on success it takes `out`'s place.

    On any error the staging directory is removed and `out` is left exactly as it was, so a
    directory of files (a tokenizer, prepared data, an export) is never seen half-written.
    """
    out = Path(out)
    if out.resolve() in (Path.cwd(), *Path.cwd().parents):
        raise GptlabError(
            f"{out} is the current directory or holds it, so it cannot be replaced; choose another directory"
        )
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp"))
        staging.chmod(0o777 & ~_umask())  # as for atomic_path: mkdtemp makes it owner-only
    except OSError as err:
        raise GptlabError(f"cannot write {out} ({err.strerror}); choose a writable directory") from None
    retired = staging.with_suffix(".old")
    try:
        yield staging
        # A directory cannot be renamed onto a non-empty one: move the old one aside first.
        fsync_tree(staging)
        if out.exists():
            out.rename(retired)
        staging.rename(out)
        fsync_path(out.parent)
    except BaseException:
        if retired.exists() and not out.exists():
            retired.rename(out)  # put the previous directory back rather than lose it
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(retired, ignore_errors=True)


def fsync_path(path: str | Path) -> None:
    """Flush a file's or directory's contents (for a directory: its entries) to disk. Where a
    directory cannot be opened for that (Windows), skip it: renames there are journaled anyway."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except (IsADirectoryError, PermissionError):
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(directory: Path) -> None:
    """fsync_path for every file and directory under `directory`, itself included."""
    for root, _, names in os.walk(directory):
        for name in names:
            fsync_path(Path(root) / name)
        fsync_path(root)


def holds_only(directory: Path, names: Collection[str]) -> bool:
    """Whether every entry of `directory` is a file named in `names` (an empty one does): what
    a directory of ours must be before staged_directory may replace it."""
    return all(entry.is_file() and entry.name in names for entry in directory.iterdir())


def _umask() -> int:
    """The process's umask: read from /proc on Linux, since elsewhere reading it means setting it
    for a moment (put straight back), which another thread creating a file could notice."""
    try:
        with open("/proc/self/status") as status:
            return next(int(line.split()[1], 8) for line in status if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask

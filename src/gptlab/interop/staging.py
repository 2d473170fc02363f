"""Writing an output directory all at once: built beside its destination, renamed into place.

With --force an existing directory is replaced only when it holds nothing but what an earlier
export wrote (its config.json says which format, and so which files); anything else in it (a
user's notes, a subfolder) makes the export refuse, naming those entries, rather than delete them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from gptlab import files
from gptlab.errors import GptlabError

# What export_hf writes: the model, its config and hf_tokenizer_files()'s names.
HF_EXPORT_FILES = frozenset(
    {
        "config.json",
        "model.safetensors",
        "vocab.json",
        "merges.txt",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    }
)
SAFETENSORS_FORMAT = "gptlab-safetensors"  # safetensors_io.FORMAT (that module imports this one)


def check_output_dir(out: str | Path, force: bool) -> Path:
    """`out` as a Path, or GptlabError if it is a file, or a non-empty directory without `force`,
    or with `force` one that holds anything an earlier export did not write.
    Call it before any slow work, so that a refusal costs nothing."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise GptlabError(f"{out} is a file; choose another --out directory")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise GptlabError(
                f"{out} already exists and is not empty; choose another --out or pass --force to replace it"
            )
        foreign = foreign_entries(out)
        if foreign:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise GptlabError(
                f"{out} holds {shown}, which no gptlab export wrote, so --force will not replace it; "
                "choose another --out or move those files away"
            )
    return out


def foreign_entries(out: Path) -> list[str]:
    """The entries under `out` (relative, a folder with a trailing /) that are not the files of
    an earlier export; all of them when `out` is not one."""
    ours = _export_files(out)
    folders = {str(Path(name).parent) for name in ours} - {"."}
    foreign: list[str] = []

    def visit(directory: Path, prefix: str) -> None:
        for entry in sorted(directory.iterdir()):
            name = prefix + entry.name
            if entry.is_symlink():
                foreign.append(name)
            elif entry.is_dir():
                if name in folders:
                    visit(entry, name + "/")
                else:
                    foreign.append(name + "/")
            elif not (entry.is_file() and name in ours):
                foreign.append(name)

    visit(out, "")
    return foreign


def _export_files(out: Path) -> set[str]:
    """Relative paths of the files the export in `out` consists of, judged by its config.json."""
    try:
        config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return set()
    if not isinstance(config, dict):
        return set()
    if config.get("format") == SAFETENSORS_FORMAT:
        entry = config.get("tokenizer")
        names = entry.get("files") if isinstance(entry, dict) else None
        if not isinstance(names, list) or not all(isinstance(n, str) and n and Path(n).name == n for n in names):
            return set()
        return {"config.json", "model.safetensors", *(f"tokenizer/{name}" for name in names)}
    if isinstance(config.get("architectures"), list):  # a Hugging Face config, as export_hf writes
        return set(HF_EXPORT_FILES)
    return set()


@contextmanager
def staged_directory(out: str | Path, force: bool = False) -> Iterator[Path]:
    """check_output_dir, then an empty directory to fill that replaces `out` only on success."""
    with files.staged_directory(check_output_dir(out, force)) as staging:
        yield staging

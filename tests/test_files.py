"""Atomic writes: what they leave behind reads like a file written the ordinary way."""

from __future__ import annotations

import os
import stat

import pytest

from gptlab.errors import GptlabError
from gptlab.files import staged_directory, write_atomic


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def mode(path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_atomic_files_and_staged_directories_follow_the_umask(tmp_path, umask_022):
    write_atomic(tmp_path / "a.json", b"{}")
    with staged_directory(tmp_path / "out") as staging:
        (staging / "inside.txt").write_text("x")
    assert (mode(tmp_path / "a.json"), mode(tmp_path / "out")) == (0o644, 0o755)
    assert (tmp_path / "out" / "inside.txt").read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "out"]  # no temporary left


def test_a_failed_staging_leaves_the_previous_directory_as_it_was(tmp_path, umask_022):
    with staged_directory(tmp_path / "out") as staging:
        (staging / "v1.txt").write_text("1")
    with pytest.raises(RuntimeError):
        with staged_directory(tmp_path / "out") as staging:
            (staging / "v2.txt").write_text("2")
            raise RuntimeError("boom")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["v1.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_the_current_directory_or_one_holding_it_is_never_replaced(tmp_path, monkeypatch):
    (tmp_path / "inner").mkdir()
    monkeypatch.chdir(tmp_path / "inner")
    for out in (".", "..", str(tmp_path)):
        with pytest.raises(GptlabError, match="is the current directory or holds it"):
            with staged_directory(out):
                pass
    assert (tmp_path / "inner").is_dir()

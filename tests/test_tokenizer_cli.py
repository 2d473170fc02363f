"""`gptlab tokenizer ...` and the seed's `src/tokenization.py`, run as a user runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from gptlab.cli import main
from gptlab.cli.tokenizer import default_output_dir, parse_ids
from gptlab.errors import GptlabError

ROOT = Path(__file__).resolve().parents[1]
SEED_SCRIPT = ROOT / "src" / "tokenization.py"
CORPUS = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 40


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def assert_clean_failure(result: subprocess.CompletedProcess, fragment: str) -> None:
    """Non-zero exit, and stderr is exactly one `error:` line that mentions `fragment`."""
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert fragment in lines[0]


@pytest.fixture
def corpus(tmp_path) -> Path:
    (tmp_path / "corpus.txt").write_text(CORPUS)
    return tmp_path / "corpus.txt"


def test_seed_script_train_encode_decode(corpus, tmp_path):
    trained = run(str(SEED_SCRIPT), "--train", "./corpus.txt", "--vocab_size", "270", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    assert "270 tokens" in trained.stdout and "merges/s" in trained.stdout
    written = sorted(p.name for p in (tmp_path / "corpus").iterdir())
    assert written == ["merges.txt", "tokenizer_config.json", "vocab.json"]

    encoded = run(str(SEED_SCRIPT), "--tokenizer", "./corpus", "--encode", "-Speak, speak.", cwd=tmp_path)
    assert encoded.returncode == 0, encoded.stderr
    ids = json.loads(encoded.stdout)
    assert all(isinstance(i, int) for i in ids) and len(ids) < len("-Speak, speak.")

    decoded = run(str(SEED_SCRIPT), "--tokenizer", "./corpus", "--decode", json.dumps(ids), cwd=tmp_path)
    assert decoded.returncode == 0, decoded.stderr
    assert decoded.stdout == "-Speak, speak.\n"

    info = run("-m", "gptlab", "tokenizer", "info", "--tokenizer", "corpus", cwd=tmp_path)
    assert info.returncode == 0, info.stderr
    assert "kind: default" in info.stdout and "vocab_size: 270" in info.stdout
    assert "<EOS>=269" in info.stdout and "fingerprint: " in info.stdout


def test_retraining_replaces_the_previous_tokenizer(corpus, tmp_path):
    for kind in ("default", "char"):
        train = ("tokenizer", "train", "corpus.txt", "--vocab_size", "265", "--type", kind)
        result = run("-m", "gptlab", *train, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in (tmp_path / "corpus").iterdir()) == ["char_vocab.json"]


def test_sentencepiece_and_char_through_the_cli(corpus, tmp_path):
    for kind in ("sentencepiece", "char"):
        out = tmp_path / kind
        train = ("tokenizer", "train", str(corpus), "--type", kind, "--vocab_size", "300", "--out", str(out))
        trained = run("-m", "gptlab", *train, cwd=tmp_path)
        assert trained.returncode == 0, trained.stderr
        encoded = run("-m", "gptlab", "tokenizer", "encode", "hear me", "--tokenizer", str(out), cwd=tmp_path)
        decoded = run(
            "-m", "gptlab", "tokenizer", "decode", encoded.stdout.strip(), "--tokenizer", str(out), cwd=tmp_path
        )
        assert decoded.stdout == "hear me\n", decoded.stderr


def test_too_small_corpus_warns_and_records_the_real_size(corpus, tmp_path):
    result = run("-m", "gptlab", "tokenizer", "train", "corpus.txt", "--vocab_size", "5000", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "warning:" in result.stderr and "Traceback" not in result.stderr
    real_size = json.loads((tmp_path / "corpus" / "tokenizer_config.json").read_text())
    info = run("-m", "gptlab", "tokenizer", "info", "--tokenizer", "corpus", cwd=tmp_path)
    size = int(next(line for line in info.stdout.splitlines() if line.startswith("vocab_size:")).split()[1])
    assert 260 < size < 5000 and f"{size} tokens" in result.stdout
    assert max(real_size["special_tokens"].values()) == size - 1


@pytest.mark.parametrize(
    ("setup", "args", "fragment"),
    [
        (None, ["missing.txt", "--vocab_size", "300"], "does not exist"),
        (b"", ["data.txt", "--vocab_size", "300"], "no text"),
        (b"\x7fELF\0\0\0binary", ["data.txt", "--vocab_size", "300"], "binary"),
        (bytes(range(0x80, 0x100)) * 8, ["data.txt", "--vocab_size", "300"], "not UTF-8"),
        (CORPUS.encode(), ["data.txt", "--vocab_size", "100"], "too small"),
        (CORPUS.encode(), ["data.txt"], "--vocab_size"),
    ],
)
def test_train_bad_inputs_fail_cleanly_and_write_nothing(tmp_path, setup, args, fragment):
    if setup is not None:
        (tmp_path / "data.txt").write_bytes(setup)
    before = sorted(p.name for p in tmp_path.iterdir())
    assert_clean_failure(run("-m", "gptlab", "tokenizer", "train", *args, cwd=tmp_path), fragment)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no output dir, no staging dir


def test_train_refuses_a_directory_holding_other_files(corpus, tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "thesis.tex").write_text("precious")
    result = run("-m", "gptlab", "tokenizer", "train", "corpus.txt", "--vocab_size", "270", cwd=tmp_path)
    assert_clean_failure(result, "not a valid tokenizer")
    assert [p.name for p in (tmp_path / "corpus").iterdir()] == ["thesis.tex"]


def test_non_utf8_bytes_are_replaced_with_a_warning(tmp_path):
    (tmp_path / "data.txt").write_bytes(CORPUS.encode() + b"caf\xe9\n")
    result = run("-m", "gptlab", "tokenizer", "train", "data.txt", "--type", "char", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "warning:" in result.stderr and "data.txt" in result.stderr and "offset" in result.stderr


def test_use_errors_fail_cleanly(corpus, tmp_path):
    assert run(str(SEED_SCRIPT), "--train", "corpus.txt", "--vocab_size", "270", cwd=tmp_path).returncode == 0
    use = ("-m", "gptlab", "tokenizer")
    assert_clean_failure(run(*use, "decode", "[1, 99999]", "--tokenizer", "corpus", cwd=tmp_path), "99999")
    assert_clean_failure(run(*use, "decode", "1, two", "--tokenizer", "corpus", cwd=tmp_path), "[1, 2, 3]")
    assert_clean_failure(run(*use, "info", "--tokenizer", "nowhere", cwd=tmp_path), "not found")
    assert_clean_failure(
        run(*use, "info", "--tokenizer", "nowhere", "--type", "sentencepiece", cwd=tmp_path), "not found"
    )
    (tmp_path / "corpus" / "vocab.json").unlink()
    assert_clean_failure(run(*use, "info", "--tokenizer", "corpus", cwd=tmp_path), "vocab.json")
    (tmp_path / "corpus" / "vocab.json").write_text("{not json")
    assert_clean_failure(run(*use, "encode", "hi", "--tokenizer", "corpus", cwd=tmp_path), "vocab.json")


def test_main_returns_status_and_prints_one_error_line(capsys, tmp_path):
    assert main(["tokenizer", "info", "--tokenizer", str(tmp_path / "none")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    with pytest.raises(SystemExit):  # argparse rejects an unknown kind itself, listing the choices
        main(["tokenizer", "info", "--type", "wordpiece"])
    assert "default" in capsys.readouterr().err


def test_parse_ids_and_default_output_dir():
    assert parse_ids("[1, 2, 3]") == [1, 2, 3] and parse_ids("[]") == []
    for bad in ("1, 2", "[1.5]", "[true]", '["1"]', "{}"):
        with pytest.raises(GptlabError):
            parse_ids(bad)
    assert default_output_dir("path/to/corpus.txt") == Path("path/to/corpus")
    assert default_output_dir("toy_data/tiny_sp_train.txt") == Path("toy_data/tiny_sp")
    assert default_output_dir("texts") == Path("texts_tokenizer")


def test_toy_tokenizer_is_the_one_the_readme_command_builds(tmp_path):
    from gptlab.tokenizers import load_tokenizer

    toy = ROOT / "toy_data"
    (tmp_path / "tiny_sp_train.txt").write_bytes((toy / "tiny_sp_train.txt").read_bytes())
    result = run(str(SEED_SCRIPT), "--train", "tiny_sp_train.txt", "--vocab_size", "384", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rebuilt, shipped = load_tokenizer(None, tmp_path / "tiny_sp"), load_tokenizer(None, toy / "tiny_sp")
    assert rebuilt.fingerprint() == shipped.fingerprint()

"""`gptlab eval --task multiple_choice` end to end (a tiny checkpoint, a GPT-2 directory scored
exactly as transformers scores it), `gptlab train --eval_task`, and the one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from gptlab.cli import main
from gptlab.config import DatasetConfig, ModelConfig, TrainConfig
from gptlab.data.choice_files import read_choice_file
from gptlab.models import GPT
from gptlab.tokenizers import BPETokenizer, load_tokenizer
from gptlab.training.checkpoint import save_checkpoint
from gptlab.training.multiple_choice import ChoiceTask

from gpt2_dirs import save_random_gpt2
from test_multiple_choice import BAD_LINES, GENERIC, HELLASWAG, TEXT, WIKIHOW, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "toy_data" / "tiny_sp"
WORDS = TEXT.split()


def synthetic_records() -> list[dict]:
    """Both formats; an empty context; contexts longer than a 32-token model; choices of varied length."""
    records: list[dict] = [
        HELLASWAG, WIKIHOW, GENERIC,
        {"context": "", "choices": ["First", "Second Citizen"], "answer": 1},
        {"context": "Who speaks first?\nAnswer: ", "choices": ["the king", "a citizen"], "answer": 1},  # space moves
    ]  # fmt: skip
    for i in range(6):
        context = " ".join(WORDS[i * 40 : i * 40 + 4 + 9 * i])
        choices = [" ".join(WORDS[1000 + 7 * i + j : 1000 + 7 * i + j + 1 + j]) for j in range(2 + i % 3)]
        records.append({"context": context, "choices": choices, "answer": i % len(choices)})
    return records


def run_error(argv: list[str], capsys) -> str:
    """Run a command that must fail; return its single error line."""
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


# ---- a gptlab checkpoint ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, Path]:
    """A small random checkpoint (with the toy tokenizer) and a file of questions in both formats."""
    tmp = tmp_path_factory.mktemp("mc")
    tokenizer = load_tokenizer(None, str(TOKENIZER))
    torch.manual_seed(0)
    cfg = ModelConfig(
        embed_dim=32, n_heads=2, num_layers=1, seq_len=32, tgt_vocab_size=tokenizer.vocab_size, dropout=0.0
    )
    model = GPT(cfg)
    path = save_checkpoint(tmp / "tiny.pth", model, tokenizer, cfg, DatasetConfig(), TrainConfig(), step=1, epoch=1)
    return path, write_jsonl(tmp / "questions.jsonl", synthetic_records())


def test_eval_multiple_choice_prints_both_accuracies_and_writes_the_scores(tiny, tmp_path, capsys):
    checkpoint, questions = tiny
    out = tmp_path / "scores.jsonl"
    argv = ["eval", "--task", "multiple_choice", "--model_path", str(checkpoint), "--data", str(questions),
            "--batch_size", "5", "--device", "cpu", "--output", str(out)]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "acc " in printed and "acc_norm " in printed and "(11 items, 33 choices" in printed

    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    items = read_choice_file(questions)
    assert [row["line"] for row in rows] == [item.line for item in items]
    model, tokenizer = GPT_and_tokenizer(checkpoint)
    expected = ChoiceTask(items, tokenizer, 32).loglikelihoods(model, batch_size=1)
    for row, lls, item in zip(rows, expected, items):
        assert row["loglikelihoods"] == pytest.approx(lls, abs=1e-5)
        assert row["answer"] == item.answer and row["prediction"] == max(range(len(lls)), key=lls.__getitem__)
    acc = sum(row["prediction"] == row["answer"] for row in rows) / len(rows)
    assert f"acc {acc:.4f}" in printed


def GPT_and_tokenizer(checkpoint: Path):
    from gptlab.training import load_model

    model, tokenizer, _ = load_model(checkpoint)
    return model.eval(), tokenizer


@pytest.mark.parametrize(("line", "message"), BAD_LINES[::3] + [BAD_LINES[7], BAD_LINES[4]])
def test_each_bad_file_is_one_line_with_its_line_number_and_writes_nothing(tiny, tmp_path, capsys, line, message):
    bad = write_jsonl(tmp_path / "bad.jsonl", [GENERIC, line])
    kept = tmp_path / "kept.jsonl"
    kept.write_text("an earlier run's scores\n", encoding="utf-8")
    for out in (tmp_path / "new.jsonl", kept):
        argv = [
            "eval",
            "--task",
            "multiple_choice",
            "--model_path",
            str(tiny[0]),
            "--data",
            str(bad),
            "--output",
            str(out),
        ]
        error = run_error(argv, capsys)
        assert error.startswith(f"error: {bad}:2: ") and message in error
    assert not (tmp_path / "new.jsonl").exists()
    assert kept.read_text(encoding="utf-8") == "an earlier run's scores\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "kept.jsonl"]  # no temporary file left


def test_misplaced_flags_are_refused(tiny, tmp_path, capsys):
    checkpoint, questions = tiny
    base = ["eval", "--model_path", str(checkpoint), "--data", str(questions)]
    assert "does not exist" in run_error(
        [*base, "--task", "multiple_choice", "--output", str(tmp_path / "no/x.jsonl")], capsys
    )
    assert "--output is for --task multiple_choice" in run_error([*base, "--output", str(tmp_path / "x.jsonl")], capsys)
    assert "--batch_size must be at least 1" in run_error(
        [*base, "--task", "multiple_choice", "--batch_size", "0"], capsys
    )
    assert "--max_batches is for --task lm" in run_error(
        [*base, "--task", "multiple_choice", "--max_batches", "2"], capsys
    )


# ---- a Hugging Face GPT-2 directory: the same numbers as transformers -------------------------------
@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory) -> Path:
    """A small random GPT-2 saved with save_pretrained, with GPT-2's vocab.json/merges.txt format
    (bytes in GPT-2's order, not 0..255; <|endoftext|> last)."""
    pytest.importorskip("transformers")
    pytest.importorskip("safetensors")
    directory = tmp_path_factory.mktemp("gpt2")
    bpe = BPETokenizer.train([TEXT], 400, pattern="gpt2", progress=False)
    save_random_gpt2(directory, bpe, n_embd=32, n_head=2, noise=0.1)
    return directory


def transformers_loglikelihoods(directory: Path, items) -> list[list[float]]:
    """lm-evaluation-harness's recipe, written out with transformers' own tokenizer and model."""
    import transformers

    tokenizer = transformers.GPT2Tokenizer.from_pretrained(directory)
    model = transformers.GPT2LMHeadModel.from_pretrained(directory).eval()
    window = model.config.n_positions
    scores = []
    for item in items:
        row = []
        for choice in item.choices:
            context, continuation = item.context, " " + choice
            if context == "":
                context_ids, continuation_ids = [tokenizer.eos_token_id], tokenizer.encode(continuation)
            else:
                spaces = len(context) - len(context.rstrip())
                if spaces:
                    context, continuation = context[:-spaces], context[-spaces:] + continuation
                whole = tokenizer.encode(context + continuation)
                context_ids = tokenizer.encode(context)
                continuation_ids = whole[len(context_ids) :]
            ids = (context_ids + continuation_ids)[-(window + 1) :][:-1]
            with torch.no_grad():
                logp = model(torch.tensor([ids])).logits[0].double().log_softmax(-1)[-len(continuation_ids) :]
            row.append(logp.gather(1, torch.tensor(continuation_ids).unsqueeze(1)).sum().item())
        scores.append(row)
    return scores


def test_a_gpt2_directory_scores_exactly_as_transformers(gpt2_dir, tmp_path, capsys, one_thread):
    questions = write_jsonl(tmp_path / "questions.jsonl", synthetic_records())
    out = tmp_path / "scores.jsonl"
    argv = ["eval", "--task", "multiple_choice", "--model_path", str(gpt2_dir), "--data", str(questions),
            "--batch_size", "4", "--device", "cpu", "--output", str(out)]  # fmt: skip
    assert main(argv) == 0
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    expected = transformers_loglikelihoods(gpt2_dir, read_choice_file(questions))
    for row, theirs in zip(rows, expected, strict=True):
        assert row["loglikelihoods"] == pytest.approx(theirs, abs=1e-4)
        assert row["prediction"] == max(range(len(theirs)), key=theirs.__getitem__)
    assert "acc_norm" in capsys.readouterr().out


# ---- during training ------------------------------------------------------------------------------
def train_args(tmp: Path, *extra: str) -> list[str]:
    (tmp / "train.txt").write_text(TEXT[:8000], encoding="utf-8")
    return [
        "train", "--tokenizer", str(TOKENIZER), "--train_data", str(tmp / "train.txt"), "--embed_dim", "32",
        "--num_layers", "1", "--n_heads", "2", "--seq_len", "32", "--batch_size", "8", "--max_steps", "4",
        "--eval_interval", "2", "--experiment_name", "mc", "--checkpoint_dir", str(tmp / "ckpt"),
        "--log_dir", str(tmp / "runs"), "--no_progress", *extra,
    ]  # fmt: skip


def test_train_scores_the_eval_task_at_each_evaluation_into_tensorboard(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    questions = write_jsonl(tmp_path / "questions.jsonl", synthetic_records())
    assert main(train_args(tmp_path, "--eval_task", str(questions))) == 0
    printed = capsys.readouterr().out
    assert printed.count("| task acc ") == 2 and "task acc" in printed.splitlines()[-2]  # steps 2 and 4, summary
    events = EventAccumulator(str(tmp_path / "runs" / "mc"))
    events.Reload()
    for tag in ("val/task_acc", "val/task_acc_norm"):
        assert [event.step for event in events.Scalars(tag)] == [2, 4]
        assert all(0.0 <= event.value <= 1.0 for event in events.Scalars(tag))


def test_a_bad_eval_task_stops_training_before_anything_is_written(tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [GENERIC, '{"context": "a", "choices": ["x", ""], "answer": 0}'])
    error = run_error(train_args(tmp_path, "--eval_task", str(bad)), capsys)
    assert error.startswith(f"error: {bad}:2: choice 1")
    assert not (tmp_path / "ckpt").exists() and not (tmp_path / "runs").exists()
    refused = run_error(train_args(tmp_path, "--eval_task", str(bad), "--model", "transformer"), capsys)
    assert "--eval_task scores a GPT's continuations" in refused

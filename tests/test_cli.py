"""End-to-end runs of `gptlab train|generate|eval|prepare` and the seed scripts on tiny data,
and the one-line errors for each bad input a user can cause."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gptlab.cli import main
from gptlab.training import load_checkpoint

from data_files import write_toy_texts

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "toy_data" / "tiny_sp"
TRAIN_TEXT = ROOT / "toy_data" / "tiny_sp_train.txt"
TINY_MODEL = ["--embed_dim", "32", "--num_layers", "1", "--n_heads", "2", "--seq_len", "16", "--batch_size", "8"]


def tiny_train_args(tmp: Path, *extra: str) -> list[str]:
    """A few-step training run that writes everything under `tmp`."""
    return [
        "train",
        "--tokenizer",
        str(TOKENIZER),
        "--train_data",
        str(tmp / "train.txt"),
        "--eval_data",
        str(tmp / "eval.txt"),
        *TINY_MODEL,
        "--max_steps",
        "4",
        "--eval_batches",
        "2",
        "--experiment_name",
        "tiny",
        "--checkpoint_dir",
        str(tmp),
        "--log_dir",
        str(tmp / "runs"),
        "--no_progress",
        *extra,
    ]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return write_toy_texts(tmp_path_factory.mktemp("cli"))


@pytest.fixture(scope="module")
def checkpoint(workdir: Path) -> Path:
    assert main(tiny_train_args(workdir)) == 0
    return workdir / "tiny_e1.pth"


def run_error(argv: list[str], capsys) -> str:
    """Run a command that must fail; return its single error line."""
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: "), err
    assert not any("Traceback" in line for line in err)
    return err[-1]


# ---- the happy paths --------------------------------------------------------------------------
def test_train_writes_checkpoint_logs_and_config(checkpoint: Path, workdir: Path) -> None:
    assert checkpoint.is_file()
    saved = torch.load(checkpoint, weights_only=True)
    assert saved["model_config"]["embed_dim"] == 32
    assert saved["tokenizer"]["kind"] == "default"
    assert (workdir / "runs" / "tiny" / "config.json").is_file()


def test_generate_is_reproducible_with_a_seed(checkpoint: Path, capsys) -> None:
    argv = ["generate", "--model_path", str(checkpoint), "--prompt", "KING:", "--length", "20", "--seed", "3"]
    assert main(argv) == 0
    first = capsys.readouterr().out
    assert main(argv) == 0
    assert capsys.readouterr().out == first
    assert first.startswith("KING:")


def test_generate_several_samples_and_greedy(checkpoint: Path, capsys) -> None:
    argv = ["generate", "--model_path", str(checkpoint), "--length", "10", "--num_samples", "2", "--greedy"]
    assert main(argv) == 0
    assert capsys.readouterr().out.count("-" * 40) == 1


def test_generate_in_bf16_holds_bf16_weights(checkpoint: Path, capsys) -> None:
    from gptlab.cli.common import load_for_generation

    model, _ = load_for_generation(str(checkpoint), "cpu", "bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    argv = ["generate", "--model_path", str(checkpoint), "--prompt", "KING:", "--length", "12", "--greedy"]
    assert main([*argv, "--device", "cpu", "--dtype", "bf16"]) == 0
    # A 4-step model's logits are near ties, so its bf16 text need not match fp32's; the numbers
    # are compared in tests/test_kv_cache.py.
    out = capsys.readouterr().out
    assert out.startswith("KING:") and len(out) > len("KING:\n")


def test_long_prompt_is_cropped_with_a_notice(checkpoint: Path, capsys) -> None:
    assert main(["generate", "--model_path", str(checkpoint), "--prompt", "to be or not " * 20, "--length", "3"]) == 0
    assert "keeping its last 16" in capsys.readouterr().err


def test_eval_prints_loss_perplexity_and_bits_per_byte(checkpoint: Path, workdir: Path, capsys) -> None:
    assert main(["eval", "--model_path", str(checkpoint), "--data", str(workdir / "eval.txt"), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "loss" in out and "perplexity" in out and "bits/byte" in out


def test_prepare_then_train_on_the_prepared_directory(workdir: Path, capsys) -> None:
    prepared = workdir / "prepared"
    assert main(["prepare", str(workdir / "train.txt"), "--tokenizer", str(TOKENIZER), "--out", str(prepared)]) == 0
    assert (prepared / "meta.json").is_file()
    args = tiny_train_args(workdir, "--experiment_name", "from_prepared")
    args[args.index("--train_data") + 1] = str(prepared)
    assert main(args) == 0
    assert (workdir / "from_prepared_e1.pth").is_file()


def test_config_file_with_flag_override(workdir: Path, tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    config.write_text("model:\n  embed_dim: 48\n  expansion_factor: 2\ntrain:\n  warmup_steps: 1\n")
    assert main([*tiny_train_args(workdir, "--experiment_name", "cfg"), "--config", str(config)]) == 0
    saved = torch.load(workdir / "cfg_e1.pth", weights_only=True)
    assert saved["model_config"]["embed_dim"] == 32  # the flag (TINY_MODEL) wins over the file
    assert saved["model_config"]["expansion_factor"] == 2
    assert saved["train_config"]["warmup_steps"] == 1


def test_seed_scripts_train_then_generate(tmp_path: Path) -> None:
    """The seed's documented commands, verbatim but for a tiny model, in a fresh directory."""
    (tmp_path / "train.txt").write_text(TRAIN_TEXT.read_text(encoding="utf-8")[:20_000], encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": ""}
    train = subprocess.run(
        [
            sys.executable,
            str(ROOT / "src" / "train_gpt.py"),
            "--tokenizer",
            str(TOKENIZER),
            "--tokenizer_type",
            "default",
            "--train_data",
            "train.txt",
            "--eval_data",
            "train.txt",
            "--epochs",
            "1",
            "--experiment_name",
            "my_gpt_experiment",
            "--embed_dim",
            "32",
            "--tgt_vocab_size",
            "1000",
            "--seq_len",
            "16",
            "--num_layers",
            "1",
            "--n_heads",
            "2",
            "--batch_size",
            "32",
            "--max_steps",
            "3",
            "--no_progress",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert train.returncode == 0, train.stderr
    assert (tmp_path / "my_gpt_experiment_e1.pth").is_file()
    generate = subprocess.run(
        [
            sys.executable,
            str(ROOT / "src" / "generate.py"),
            "--prompt",
            "Once upon a time",
            "--model_path",
            "my_gpt_experiment_e1.pth",
            "--tokenizer_path",
            str(TOKENIZER),
            "--vocab_size",
            "1000",
            "--length",
            "20",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert generate.returncode == 0, generate.stderr
    assert generate.stdout.startswith("Once upon a time")


def test_ctrl_c_on_the_command_line_finishes_the_step_and_saves(workdir: Path, tmp_path: Path) -> None:
    """A real SIGINT to `gptlab train`: the run stops at a step boundary, saves, prints its summary
    and exits with status 130, as interrupted commands do."""
    args = [*tiny_train_args(workdir), "--max_steps", "100000", "--eval_interval", "100000"]
    args[args.index("--checkpoint_dir") + 1] = str(tmp_path)
    args[args.index("--log_dir") + 1] = str(tmp_path / "runs")
    run = subprocess.Popen(
        [sys.executable, "-m", "gptlab", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    steps = tmp_path / "runs" / "tiny" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while run.poll() is None and time.monotonic() < deadline:
        if steps.is_file() and steps.read_text().count("\n") >= 3:
            break
        time.sleep(0.1)
    run.send_signal(signal.SIGINT)
    out, err = run.communicate(timeout=120)
    assert run.returncode == 130, err  # saved, and still telling a script that it was interrupted
    assert "Ctrl-C: stopping after this step" in err
    summary = out.strip().splitlines()[-2]
    assert summary.startswith("interrupted: ")
    steps_done = int(summary.split()[1])
    assert load_checkpoint(tmp_path / "tiny_e1.pth").step == steps_done >= 3


# ---- bad input: one line, non-zero exit, nothing overwritten ----------------------------------
def test_missing_train_data(workdir: Path, capsys) -> None:
    args = tiny_train_args(workdir)
    args[args.index("--train_data") + 1] = str(workdir / "nope.txt")
    assert "nope.txt" in run_error(args, capsys)


def test_missing_tokenizer(workdir: Path, capsys) -> None:
    args = tiny_train_args(workdir)
    args[args.index("--tokenizer") + 1] = str(workdir / "no_tokenizer")
    assert "no_tokenizer" in run_error(args, capsys)


def test_empty_data(workdir: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "empty.txt").write_text("")
    args = tiny_train_args(workdir)
    args[args.index("--train_data") + 1] = str(tmp_path / "empty.txt")
    run_error(args, capsys)


def test_data_shorter_than_one_window(workdir: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "short.txt").write_text("To be.")
    args = tiny_train_args(workdir)
    args[args.index("--train_data") + 1] = str(tmp_path / "short.txt")
    assert "seq_len" in run_error(args, capsys)


def test_vocab_smaller_than_tokenizer(workdir: Path, capsys) -> None:
    assert "tgt_vocab_size" in run_error(tiny_train_args(workdir, "--tgt_vocab_size", "100"), capsys)


@pytest.mark.parametrize(
    "flags, field",
    [(["--n_heads", "5"], "n_heads"), (["--learning_rate", "-1"], "learning_rate"), (["--seq_len", "0"], "seq_len")],
)
def test_invalid_config_values_name_the_field(workdir: Path, capsys, flags: list[str], field: str) -> None:
    assert field in run_error(tiny_train_args(workdir, *flags), capsys)


def test_unknown_field_in_config_file(workdir: Path, tmp_path: Path, capsys) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("embed_dimm: 64\n")
    assert "embed_dimm" in run_error([*tiny_train_args(workdir), "--config", str(config)], capsys)


def test_unknown_device(workdir: Path, capsys) -> None:
    assert "tpu" in run_error(tiny_train_args(workdir, "--device", "tpu"), capsys)


def test_fp16_weights_on_cpu_are_refused(checkpoint: Path, capsys) -> None:
    message = run_error(["generate", "--model_path", str(checkpoint), "--device", "cpu", "--dtype", "fp16"], capsys)
    assert "fp16 is for GPUs" in message and "bf16" in message


def test_checkpoint_not_ours_or_truncated(checkpoint: Path, tmp_path: Path, capsys) -> None:
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint")
    run_error(["generate", "--model_path", str(text)], capsys)
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(checkpoint.read_bytes()[:5000])
    run_error(["generate", "--model_path", str(truncated)], capsys)
    foreign = tmp_path / "foreign.pth"
    torch.save({"weights": torch.zeros(3)}, foreign)
    assert "not a gptlab checkpoint" in run_error(["eval", "--model_path", str(foreign), "--data", "x"], capsys)


def test_shape_flag_contradicting_checkpoint(checkpoint: Path, capsys) -> None:
    message = run_error(["generate", "--model_path", str(checkpoint), "--embed_dim", "384"], capsys)
    assert "--embed_dim 384" in message and "embed_dim = 32" in message


def test_tokenizer_path_disagreeing_with_checkpoint(checkpoint: Path, tmp_path: Path, capsys) -> None:
    other = tmp_path / "other_tok"
    assert main(["tokenizer", "train", str(TRAIN_TEXT), "--vocab_size", "300", "--out", str(other)]) == 0
    capsys.readouterr()
    assert "not the tokenizer" in run_error(
        ["generate", "--model_path", str(checkpoint), "--tokenizer_path", str(other)], capsys
    )


def test_failed_run_keeps_existing_checkpoint(checkpoint: Path, workdir: Path, capsys) -> None:
    before = checkpoint.read_bytes()
    run_error(tiny_train_args(workdir, "--n_heads", "5"), capsys)
    assert checkpoint.read_bytes() == before


def test_export_safetensors_then_generate_and_eval_from_the_directory(checkpoint: Path, workdir: Path, capsys) -> None:
    out = workdir / "exported"
    assert main(["export", "--model_path", str(checkpoint), "--format", "safetensors", "--out", str(out)]) == 0
    capsys.readouterr()
    argv = ["--prompt", "KING:", "--length", "12", "--seed", "5"]
    assert main(["generate", "--model_path", str(checkpoint), *argv]) == 0
    from_checkpoint = capsys.readouterr().out
    assert main(["generate", "--model_path", str(out), *argv]) == 0
    assert capsys.readouterr().out == from_checkpoint
    assert main(["eval", "--model_path", str(out), "--data", str(workdir / "eval.txt")]) == 0
    assert "bits/byte" in capsys.readouterr().out
    assert "not empty" in run_error(
        ["export", "--model_path", str(checkpoint), "--format", "safetensors", "--out", str(out)], capsys
    )


@pytest.mark.parametrize(
    ("flags", "words"),
    [
        (["--temperature", "inf"], "temperature"),
        (["--temperature", "1000"], "temperature"),
        (["--repetition_penalty", "1e-45"], "repetition_penalty"),
        (["--seed", str(2**64)], "seed"),
        (["--window_keep", "1000"], "window_keep=1000 exceeds the model's context (seq_len=16)"),
    ],
)
def test_out_of_range_sampling_values_are_one_line_errors_before_any_output(checkpoint, capsys, flags, words):
    argv = ["generate", "--model_path", str(checkpoint), "--prompt", "Once", "--length", "3", *flags]
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert captured.out == ""  # not even the prompt
    assert captured.err.count("\n") == 1 and captured.err.startswith("error: ") and words in captured.err


def test_a_tiny_temperature_samples_the_most_likely_token(checkpoint, capsys) -> None:
    common = ["generate", "--model_path", str(checkpoint), "--prompt", "Once", "--length", "8", "--device", "cpu"]
    assert main([*common, "--temperature", "1e-40", "--seed", "3"]) == 0
    tiny = capsys.readouterr().out
    assert main([*common, "--greedy"]) == 0
    assert tiny == capsys.readouterr().out

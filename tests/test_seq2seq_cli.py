"""`gptlab train --model transformer` and `gptlab generate` on a Transformer checkpoint, end to end,
and the one-line errors for checkpoints of the wrong kind and bad paired data."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from gptlab.cli import main
from gptlab.config import DatasetConfig, ModelConfig, TrainConfig
from gptlab.generation import translate
from gptlab.models import GPT
from gptlab.tokenizers import CharTokenizer
from gptlab.training import load_checkpoint, load_transformer, save_checkpoint

WORDS = ["abc", "bad", "cab", "dab", "ace", "bead", "face", "fade", "cafe", "deaf"]


def gptlab(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gptlab", *args], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A Transformer trained a few steps through the command line, on pairs with one bad line."""
    tmp = tmp_path_factory.mktemp("seq2seq_cli")
    CharTokenizer("abcdef").save(tmp / "tokenizer")
    lines = [f"{word}\t{word[::-1]}" for word in WORDS]
    (tmp / "train.tsv").write_text("\n".join(lines[:3] + ["no tab on this line"] + lines[3:]) + "\n")
    (tmp / "eval.tsv").write_text("\n".join(lines[:4]) + "\n")
    result = gptlab(
        "train", "--model", "transformer", "--tokenizer", "tokenizer", "--train_data", "train.tsv",
        "--eval_data", "eval.tsv", "--skip_bad_lines", "--embed_dim", "32", "--n_heads", "2", "--num_layers", "1",
        "--num_decoder_layers", "2", "--seq_len", "8", "--max_source_len", "8", "--batch_size", "4",
        "--max_steps", "3", "--label_smoothing", "0.1", "--experiment_name", "s2s", "--device", "cpu",
        "--no_progress", cwd=tmp,
    )  # fmt: skip
    return tmp, result


def test_train_writes_a_transformer_checkpoint(trained):
    tmp, result = trained
    assert result.returncode == 0, result.stderr
    assert "skipped 1 bad line(s) (line 4; first: no tab between source and target)" in result.stderr
    assert "exact match" in result.stdout
    checkpoint = load_checkpoint(tmp / "s2s_e1.pth")
    assert checkpoint.model_type == "transformer"
    assert (checkpoint.model_config.encoder_layers, checkpoint.model_config.decoder_layers) == (1, 2)
    assert checkpoint.model_config.pos_encoding == "sinusoidal"
    assert checkpoint.train_config.label_smoothing == 0.1
    assert (tmp / "runs" / "s2s").is_dir()


@pytest.mark.parametrize("beam_size", [1, 3])
def test_generate_prints_what_the_python_api_decodes(trained, beam_size):
    tmp, _ = trained
    result = gptlab(
        "generate", "--model_path", "s2s_e1.pth", "--prompt", "bead", "--beam_size", str(beam_size),
        "--device", "cpu", cwd=tmp,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    model, tokenizer, _ = load_transformer(tmp / "s2s_e1.pth")
    assert result.stdout == translate(model, tokenizer, ["bead"], beam_size=beam_size)[0] + "\n"


def test_generate_with_bf16_weights_matches_the_python_api_in_bf16(trained):
    tmp, _ = trained
    result = gptlab(
        "generate", "--model_path", "s2s_e1.pth", "--prompt", "bead", "--dtype", "bf16", "--device", "cpu", cwd=tmp
    )
    assert result.returncode == 0, result.stderr
    model, tokenizer, _ = load_transformer(tmp / "s2s_e1.pth")
    assert result.stdout == translate(model.to(torch.bfloat16), tokenizer, ["bead"])[0] + "\n"


@pytest.fixture
def gpt_checkpoint(tmp_path):
    cfg = ModelConfig(embed_dim=16, n_heads=2, num_layers=1, seq_len=8, tgt_vocab_size=10)
    path = tmp_path / "gpt.pth"
    save_checkpoint(path, GPT(cfg), CharTokenizer("abcdef"), cfg, DatasetConfig(), TrainConfig(), step=0, epoch=1)
    return path


def run_main(capsys, *args: str) -> tuple[int, str]:
    status = main(list(args))
    return status, capsys.readouterr().err.strip()


def test_beam_search_on_a_gpt_checkpoint_is_one_clear_error(gpt_checkpoint, capsys):
    status, err = run_main(capsys, "generate", "--model_path", str(gpt_checkpoint), "--beam_size", "2")
    assert status == 1 and err.startswith("error: --beam_size applies to encoder-decoder Transformer checkpoints")
    assert len(err.splitlines()) == 1


def test_a_gpt_checkpoint_is_not_a_transformer_and_vice_versa(trained, gpt_checkpoint, capsys):
    with pytest.raises(Exception, match="holds a GPT, not an encoder-decoder Transformer"):
        load_transformer(gpt_checkpoint)
    tmp, _ = trained
    status, err = run_main(capsys, "eval", "--model_path", str(tmp / "s2s_e1.pth"), "--data", str(tmp / "eval.tsv"))
    assert status == 1 and "holds an encoder-decoder Transformer, not a GPT" in err
    assert len(err.splitlines()) == 1


def test_sampling_flags_and_empty_prompts_are_refused_for_a_transformer(trained, capsys):
    tmp, _ = trained
    path = str(tmp / "s2s_e1.pth")
    status, err = run_main(capsys, "generate", "--model_path", path, "--prompt", "abc", "--top_k", "5")
    assert status == 1 and err.startswith("error: --top_k applies to GPT checkpoints")
    status, err = run_main(capsys, "generate", "--model_path", path)
    assert status == 1 and "pass it with --prompt" in err


def test_bad_paired_data_is_refused_without_skip_bad_lines(trained, capsys):
    tmp, _ = trained
    status, err = run_main(
        capsys, "train", "--model", "transformer", "--tokenizer", str(tmp / "tokenizer"),
        "--train_data", str(tmp / "train.tsv"), "--device", "cpu", "--checkpoint_dir", str(tmp / "never"),
    )  # fmt: skip
    assert status == 1
    expected = f"{tmp / 'train.tsv'} line 4: no tab between source and target; fix it or pass --skip_bad_lines"
    assert err == f"error: {expected}"
    assert not (tmp / "never").exists()


def test_resuming_a_transformer_run_from_a_gpt_checkpoint_is_refused(trained, gpt_checkpoint, capsys):
    tmp, _ = trained
    status, err = run_main(
        capsys, "train", "--model", "transformer", "--tokenizer", str(tmp / "tokenizer"),
        "--train_data", str(tmp / "eval.tsv"), "--device", "cpu", "--resume", str(gpt_checkpoint),
        "--log_dir", str(tmp / "runs_resume"),
    )  # fmt: skip
    assert status == 1 and "was trained with other model" in err
    assert torch.load(gpt_checkpoint, weights_only=True)["model_type"] == "gpt"  # untouched

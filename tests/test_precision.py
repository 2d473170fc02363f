"""Mixed precision and torch.compile, each checked against float32 eager training on a tiny GPT."""

from __future__ import annotations

import pytest
from helpers import ByteTokenizer
import torch

from gptlab.config import DatasetConfig, ModelConfig, TrainConfig
from gptlab.device import resolve_dtype
from gptlab.errors import GptlabError
from gptlab.training import load_checkpoint, train
from gptlab.training.run_files import read_step_log


pytestmark = pytest.mark.usefixtures("knows_test_tokenizer")  # see conftest.py


@pytest.fixture
def text(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog.\n" for i in range(40)))
    return path


def losses(tmp_path, text, name: str, **train_settings) -> list[float]:
    """Per-step training losses of a 4-step run of a tiny GPT."""
    model = ModelConfig(embed_dim=32, num_layers=2, n_heads=2, seq_len=32, dropout=0.0)
    cfg = TrainConfig(
        max_steps=4, learning_rate=3e-3, warmup_steps=1, eval_interval=100, experiment_name=name,
        checkpoint_dir=str(tmp_path / "ckpt"), log_dir=str(tmp_path / "runs"), device="cpu", seed=0,
        **train_settings,
    )  # fmt: skip
    result = train(model, DatasetConfig(batch_size=8), cfg, ByteTokenizer(), text, progress=False)
    assert result.steps == 4
    return [entry["loss"] for entry in read_step_log(tmp_path / "runs" / name / "metrics.jsonl")]


def test_bf16_autocast_on_cpu_tracks_fp32(tmp_path, text):
    fp32 = losses(tmp_path, text, "fp32", dtype="fp32")
    bf16 = losses(tmp_path, text, "bf16", dtype="bf16")
    assert bf16 != fp32  # it really ran in bfloat16
    for a, b in zip(fp32, bf16):
        assert b == pytest.approx(a, rel=2e-2)
    # Weights stay float32: the checkpoint loads anywhere.
    state = load_checkpoint(tmp_path / "ckpt" / "bf16_e1.pth").model_state
    assert all(t.dtype == torch.float32 for t in state.values())


def test_fp16_on_cpu_is_a_clear_error(tmp_path, text):
    with pytest.raises(GptlabError, match="--dtype fp16 needs a CUDA GPU"):
        losses(tmp_path, text, "fp16", dtype="fp16")


def test_auto_dtype_is_fp32_on_cpu():
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bf16", torch.device("cpu")) == torch.bfloat16


def test_compiled_model_matches_eager(tmp_path, text):
    # ~15 s on 2 CPU cores: inductor compiles C++ kernels for the forward and the backward.
    eager = losses(tmp_path, text, "eager")
    compiled = losses(tmp_path, text, "compiled", compile=True)
    for a, b in zip(eager, compiled):
        assert b == pytest.approx(a, abs=1e-5, rel=1e-5)
    # The checkpoint of a compiled run holds the plain model's weight names.
    state = load_checkpoint(tmp_path / "ckpt" / "compiled_e1.pth").model_state
    assert not any("_orig_mod" in key for key in state)

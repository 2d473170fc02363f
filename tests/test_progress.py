"""RunProgress: a run's position saved into a checkpoint and read back, and checkpoints written
before it (the trainer's string-keyed dict, or no progress entries at all) still resume exactly."""

from __future__ import annotations

import pytest
import torch

from gptlab.config import DatasetConfig, ModelConfig, TrainConfig
from gptlab.models import GPT
from gptlab.training import load_checkpoint, save_checkpoint, train
from gptlab.training.checkpoint import capture_rng_state
from gptlab.training.progress import RunProgress

from helpers import ByteTokenizer

pytestmark = pytest.mark.usefixtures("knows_test_tokenizer")  # see conftest.py

LINES = ["the cat sat on the mat.", "a dog ran in the park.", "we like to read books.", "it is a sunny day."]


def test_progress_round_trips_through_a_checkpoint(tmp_path):
    model_cfg = ModelConfig(embed_dim=16, num_layers=1, n_heads=2, seq_len=8, tgt_vocab_size=300)
    rng = capture_rng_state()
    progress = RunProgress(
        step=7, epoch=2, epoch_batches_done=3, tokens_seen=896, step_batch=16, train_tokens=1234,
        grad_scaler={"scale": 2.0}, bf16_fast=True, rank_rngs=[rng, rng],
    )  # fmt: skip
    path = save_checkpoint(
        tmp_path / "c.pth", GPT(model_cfg), ByteTokenizer(), model_cfg, DatasetConfig(), TrainConfig(),
        step=progress.step, epoch=progress.epoch, extra=progress.to_extra(),
    )  # fmt: skip
    back = RunProgress.from_checkpoint(load_checkpoint(path), batches_per_epoch=4)
    assert (back.step, back.epoch, back.epoch_batches_done, back.tokens_seen) == (7, 2, 3, 896)
    assert (back.step_batch, back.train_tokens, back.grad_scaler) == (16, 1234, {"scale": 2.0})
    assert back.bf16_fast is True and RunProgress.recorded_bf16_fast(load_checkpoint(path)) is True
    assert back.rng is not None and len(back.rank_rngs) == 2
    assert back.start(batches_per_epoch=4) == (2, 3)  # mid-epoch: the same epoch, its 4th batch
    assert back.start(batches_per_epoch=3) == (3, 0)  # its last batch done: the next epoch


@pytest.fixture
def corpus(tmp_path):
    train_text = "\n".join(LINES[(i * 7) % 4] for i in range(60)) + "\n"  # 6 batches of 16 x 16
    (tmp_path / "train.txt").write_text(train_text)
    return tmp_path / "train.txt"


def configs(directory):
    model = ModelConfig(embed_dim=32, num_layers=2, n_heads=2, seq_len=16, dropout=0.1)
    settings = {
        "epochs": 2, "learning_rate": 3e-3, "warmup_steps": 2, "eval_interval": 100, "checkpoint_every": 1,
        "experiment_name": "tiny", "checkpoint_dir": str(directory), "log_dir": str(directory / "runs"),
        "device": "cpu", "seed": 0,
    }  # fmt: skip
    return model, DatasetConfig(batch_size=16), TrainConfig(**settings)


@pytest.mark.parametrize("form", ["dict", "none"])
def test_checkpoints_written_before_run_progress_resume_exactly(tmp_path, corpus, form):
    whole = train(*configs(tmp_path / "whole"), ByteTokenizer(), corpus, progress=False)
    raw = torch.load(tmp_path / "whole" / "tiny_e1.pth", weights_only=True)  # the end of epoch 1
    extra = raw["extra"]
    if form == "dict":  # the dict the trainer wrote, key by key
        raw["extra"] = {
            "epoch_batches_done": int(extra["epoch_batches_done"]),
            "tokens_seen": int(extra["tokens_seen"]),
            "step_batch": int(extra["step_batch"]),
            "train_tokens": int(extra["train_tokens"]),
            "grad_scaler": None,
        }
    else:  # written before the position within an epoch was recorded: whole epochs only
        raw["extra"] = {}
    torch.save(raw, tmp_path / "old.pth")

    rest = train(*configs(tmp_path / "rest"), ByteTokenizer(), corpus, progress=False, resume=tmp_path / "old.pth")

    assert (rest.stopped_reason, rest.steps, rest.epochs_completed) == ("completed", whole.steps, 2)
    if form == "dict":
        assert rest.tokens_seen == whole.tokens_seen
    a, b = load_checkpoint(whole.final_checkpoint), load_checkpoint(rest.final_checkpoint)
    for name, tensor in a.model_state.items():
        torch.testing.assert_close(b.model_state[name], tensor, rtol=0, atol=0, msg=name)

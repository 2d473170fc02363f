"""Checkpoints (format, round trip, refusing bad files), device choice, optimizer and metrics."""

from __future__ import annotations

import itertools
import math
import random

import numpy as np
import pytest
import torch

from gptlab.config import DatasetConfig, ModelConfig, TrainConfig
from gptlab.device import resolve_device
from gptlab.errors import GptlabError
from gptlab.models import GPT
from gptlab.training import load_checkpoint, load_model, save_checkpoint
from gptlab.training.checkpoint import VERSION, capture_rng_state, restore_rng_state
from gptlab.training.metrics import (
    bits_per_byte,
    device_peak_flops,
    format_mfu,
    model_flops_utilization,
    peak_flops,
)
from gptlab.training.optim import build_optimizer, lr_at, total_steps

from helpers import ByteTokenizer

pytestmark = pytest.mark.usefixtures("knows_test_tokenizer")  # see conftest.py


def tiny_configs(**train):
    model = ModelConfig(embed_dim=32, num_layers=2, n_heads=2, seq_len=16, tgt_vocab_size=260, dropout=0.0)
    return model, DatasetConfig(batch_size=4), TrainConfig(**train)


@pytest.fixture
def saved(tmp_path):
    """A checkpoint of a tiny GPT after one optimizer step, and what went into it."""
    torch.manual_seed(0)
    model_cfg, data_cfg, train_cfg = tiny_configs(learning_rate=1e-3)
    model = GPT(model_cfg)
    optimizer = build_optimizer(model, train_cfg, torch.device("cpu"))
    idx = torch.randint(0, 260, (2, 16))
    model(idx, idx)[1].backward()
    optimizer.step()
    path = tmp_path / "run_e3.pth"
    save_checkpoint(
        path,
        model,
        ByteTokenizer(),
        model_cfg,
        data_cfg,
        train_cfg,
        step=7,
        epoch=3,
        optimizer=optimizer,
        extra={"epoch_batches_done": 2},
    )
    return path, model, (model_cfg, data_cfg, train_cfg)


# ---- round trip ---------------------------------------------------------------------------------
def test_checkpoint_holds_only_tensors_and_plain_values(saved):
    path, _, _ = saved
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == "gptlab-checkpoint" and raw["version"] == VERSION and raw["model_type"] == "gpt"
    assert raw["tokenizer"] == {"kind": "test-bytes", "files": ByteTokenizer().to_files()}
    assert isinstance(raw["rng"]["torch"], torch.Tensor) and isinstance(raw["gptlab_version"], str)
    assert not list(path.parent.glob(".*.tmp"))  # the temporary file was renamed into place


def test_round_trip_gives_same_logits_tokenizer_and_configs(saved):
    path, model, (model_cfg, data_cfg, train_cfg) = saved
    loaded, tokenizer, checkpoint = load_model(path)
    assert not loaded.training
    idx = torch.randint(0, 260, (3, 16))
    model.eval()
    torch.testing.assert_close(loaded(idx)[0], model(idx)[0], rtol=0, atol=0)
    assert tokenizer.to_files() == ByteTokenizer().to_files()
    assert (checkpoint.model_config, checkpoint.data_config, checkpoint.train_config) == (
        model_cfg,
        data_cfg,
        train_cfg,
    )
    assert (checkpoint.step, checkpoint.epoch, checkpoint.extra) == (7, 3, {"epoch_batches_done": 2})
    # The optimizer state comes back too: a fresh AdamW accepts it and holds the same moments.
    optimizer = build_optimizer(loaded, checkpoint.train_config, torch.device("cpu"))
    optimizer.load_state_dict(checkpoint.optimizer_state)
    assert all(state["step"].item() == 1 for state in optimizer.optimizers["adamw"].state.values())


def test_rng_state_round_trip():
    state = capture_rng_state()
    drawn = (torch.rand(3), np.random.rand(3), random.random())
    restore_rng_state(state)
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(drawn[0], again[0]) and np.array_equal(drawn[1], again[1]) and drawn[2] == again[2]


def test_failed_save_leaves_existing_checkpoint_untouched(saved, monkeypatch):
    path, model, configs = saved
    before = path.read_bytes()

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(path, model, ByteTokenizer(), *configs, step=8, epoch=3)
    assert path.read_bytes() == before
    assert not list(path.parent.glob(".*.tmp"))


# ---- bad inputs -----------------------------------------------------------------------------------
def test_missing_file(tmp_path):
    with pytest.raises(GptlabError, match="not found"):
        load_checkpoint(tmp_path / "nope.pth")


def test_truncated_file(saved, tmp_path):
    path, _, _ = saved
    cut = tmp_path / "cut.pth"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(GptlabError, match="not a readable gptlab checkpoint: it is truncated or not a torch file;"):
        load_checkpoint(cut)


def test_text_file(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("hello\n")
    with pytest.raises(GptlabError, match="not a readable gptlab checkpoint: it is (truncated or )?not a torch file"):
        load_checkpoint(path)


def test_torch_file_that_is_not_ours(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"weight": torch.zeros(3), "epoch": 2}, path)
    with pytest.raises(GptlabError, match="not a gptlab checkpoint"):
        load_checkpoint(path)


class Payload:
    pass


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "pickle.pth"
    torch.save({"format": "gptlab-checkpoint", "obj": Payload()}, path)
    with pytest.raises(GptlabError, match="it holds Python objects, not only tensors .* will not unpickle them;"):
        load_checkpoint(path)


def test_future_version(saved):
    path, _, _ = saved
    raw = torch.load(path, weights_only=True)
    raw["version"] = VERSION + 1
    torch.save(raw, path)
    with pytest.raises(GptlabError, match="upgrade gptlab"):
        load_checkpoint(path)


def test_weights_that_do_not_match_the_config(saved):
    path, _, _ = saved
    raw = torch.load(path, weights_only=True)
    raw["model_config"]["num_layers"] = 3
    torch.save(raw, path)
    with pytest.raises(GptlabError, match="weights do not match the model config"):
        load_model(path)


def test_invalid_config_in_checkpoint(saved):
    path, _, _ = saved
    raw = torch.load(path, weights_only=True)
    raw["model_config"]["n_heads"] = 5
    torch.save(raw, path)
    with pytest.raises(GptlabError, match="n_heads"):
        load_checkpoint(path)


# ---- device -----------------------------------------------------------------------------------------
def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in {"cpu", "cuda", "mps"}
    with pytest.raises(GptlabError, match="unknown device"):
        resolve_device("tpu")
    with pytest.raises(GptlabError):
        resolve_device("cuda:99")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_gpu_is_a_clear_error():
    with pytest.raises(GptlabError, match="not available"):
        resolve_device("cuda")


# ---- optimizer and schedule ----------------------------------------------------------------------------
def test_lr_schedule_warms_up_linearly_then_decays_to_the_floor():
    cfg = TrainConfig(learning_rate=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    lrs = [lr_at(step, 100, cfg) for step in range(101)]
    warmup = lrs[:10]
    assert warmup == pytest.approx([1e-3 * (s + 1) / 10 for s in range(10)])
    assert max(lrs) == pytest.approx(1e-3) and lrs[10] == pytest.approx(1e-3)
    decay = lrs[10:]
    assert all(a >= b for a, b in itertools.pairwise(decay))  # monotone down after the peak
    assert lrs[55] == pytest.approx(1e-4 + 0.5 * 9e-4)  # half way: the cosine's midpoint
    assert lrs[100] == pytest.approx(1e-4) and lr_at(500, 100, cfg) == pytest.approx(1e-4)


def test_wsd_schedule_holds_the_peak_then_decays_in_a_straight_line_to_the_floor():
    cfg = TrainConfig(learning_rate=1e-3, warmup_steps=10, min_lr_ratio=0.1, lr_schedule="wsd", decay_fraction=0.3)
    lrs = [lr_at(step, 100, cfg) for step in range(101)]
    assert lrs[:10] == pytest.approx([1e-3 * (s + 1) / 10 for s in range(10)])
    assert lrs[10:70] == pytest.approx([1e-3] * 60)  # stable until the last 30 steps
    assert lrs[70:] == pytest.approx([1e-3 - 9e-4 * (s - 70) / 30 for s in range(70, 101)])
    assert lrs[100] == pytest.approx(1e-4) and lr_at(500, 100, cfg) == pytest.approx(1e-4)
    # A decay longer than the steps after warmup starts right after warmup.
    whole = TrainConfig(learning_rate=1e-3, warmup_steps=10, min_lr_ratio=0.0, lr_schedule="wsd", decay_fraction=1.0)
    assert lr_at(10, 100, whole) == pytest.approx(1e-3) and lr_at(55, 100, whole) == pytest.approx(5e-4)


def test_total_steps_is_capped_by_max_steps():
    assert total_steps(epochs=3, batches_per_epoch=10, max_steps=None) == 30
    assert total_steps(epochs=3, batches_per_epoch=10, max_steps=7) == 7
    assert total_steps(epochs=3, batches_per_epoch=10, max_steps=70) == 30


def test_weight_decay_only_on_matrices():
    model_cfg, _, train_cfg = tiny_configs(weight_decay=0.25, beta1=0.8, beta2=0.9)
    model = GPT(model_cfg.model_copy(update={"bias": True}))
    optimizer = build_optimizer(model, train_cfg, torch.device("cpu"))
    decay = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0.25 for p in g["params"]}
    no_decay = {id(p) for g in optimizer.param_groups if g["weight_decay"] == 0.0 for p in g["params"]}
    params = list(model.parameters())
    assert decay == {id(p) for p in params if p.dim() >= 2} and decay
    assert no_decay == {id(p) for p in params if p.dim() < 2} and no_decay
    assert all(g["betas"] == (0.8, 0.9) for g in optimizer.param_groups)


# ---- metrics ------------------------------------------------------------------------------------------------
def test_bits_per_byte():
    # A uniform guess over 256 byte values costs 8 bits per byte whatever the token length.
    assert bits_per_byte(math.log(256), bytes_per_token=1.0) == pytest.approx(8.0)
    assert bits_per_byte(2 * math.log(256), bytes_per_token=2.0) == pytest.approx(8.0)


def test_mfu():
    assert peak_flops(torch.device("cpu")) is None
    assert model_flops_utilization(1e9, 1e3, None) is None and format_mfu(None) == "n/a"
    assert model_flops_utilization(6e9, 5e4, 1e15) == pytest.approx(0.3)
    assert format_mfu(0.3) == "30.0%"


def test_a_gpus_peak_is_its_data_sheets_for_the_dtype_the_run_computes_in(monkeypatch):
    cuda = torch.device("cuda")  # only its name is asked for: no GPU needed
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert peak_flops(cuda, torch.bfloat16) == peak_flops(cuda, torch.float16) == 989e12
    assert peak_flops(cuda, torch.float32) == 495e12  # TF32
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 PCIe")
    assert peak_flops(cuda, torch.bfloat16) == 756e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    assert peak_flops(cuda, torch.bfloat16) is None
    assert device_peak_flops(cuda, torch.bfloat16, given=5e12) == 5e12  # --peak_flops wins

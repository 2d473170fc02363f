"""Damaged checkpoints and weight files give one clear line: configs that claim models their
weights do not hold (checked before any allocation), fields of the wrong type or range, states
that cannot be restored, random bytes; and atomic writes reach the disk before the rename."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gptlab import files
from gptlab.cli import main
from gptlab.config import DatasetConfig, ModelConfig, TrainConfig
from gptlab.errors import GptlabError
from gptlab.models import GPT
from gptlab.training import load_checkpoint, load_model, save_checkpoint
from gptlab.training.optim import build_optimizer

from helpers import ByteTokenizer

pytestmark = pytest.mark.usefixtures("knows_test_tokenizer")  # see conftest.py
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    """A tiny GPT's checkpoint after one optimizer step, as gptlab train writes it."""
    torch.manual_seed(0)
    model_cfg = ModelConfig(embed_dim=32, num_layers=2, n_heads=2, seq_len=16, tgt_vocab_size=260, dropout=0.0)
    model = GPT(model_cfg)
    optimizer = build_optimizer(model, TrainConfig(), torch.device("cpu"))
    idx = torch.randint(0, 260, (2, 16))
    model(idx, idx)[1].backward()
    optimizer.step()
    path = tmp_path / "run_e1.pth"
    save_checkpoint(
        path,
        model,
        ByteTokenizer(),
        model_cfg,
        DatasetConfig(batch_size=4),
        TrainConfig(),
        step=1,
        epoch=1,
        optimizer=optimizer,
        extra={"tokens_seen": 64, "epoch_batches_done": 1},
    )
    return path


def edited(path: Path, edit) -> Path:
    raw = torch.load(path, weights_only=True)
    edit(raw)
    torch.save(raw, path)
    return path


# ---- configs that do not describe the weights ------------------------------------------------------
def test_a_config_claiming_a_huge_model_is_refused_without_allocating(saved: Path) -> None:
    edited(saved, lambda raw: raw["model_config"].update(embed_dim=10**9, n_heads=1))
    with pytest.raises(GptlabError, match=rf"{saved.name}: its model config describes an impossible model"):
        load_model(saved)


def test_a_config_claiming_a_bigger_model_is_refused_before_building_it(saved: Path) -> None:
    # 12 x 1024 is 151 M parameters (605 MB; building it grew the peak by 586 MB before the fix, by
    # 78 MB after, imports included); the file holds 0.1 M. Measured in a fresh process.
    edited(saved, lambda raw: raw["model_config"].update(embed_dim=1024, num_layers=12, n_heads=16))
    script = f"""
import resource, sys
sys.path.insert(0, {str(ROOT / "tests")!r})
import torch
from helpers import ByteTokenizer
from gptlab.errors import GptlabError
from gptlab.training import checkpoint
checkpoint.tokenizer_from_files = lambda kind, files: ByteTokenizer()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    checkpoint.load_model({str(saved)!r})
except GptlabError as error:
    print(error)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run(
        [sys.executable, "-c", script], check=False, capture_output=True, text=True, timeout=120, env=env
    )
    message, grown_mb = done.stdout.strip().splitlines()
    assert "weights do not match the model config" in message and "wrong shape" in message
    assert int(grown_mb) < 250, f"peak memory grew by {grown_mb} MB before the mismatch was reported"


def test_weights_of_another_dtype_are_named(saved: Path) -> None:
    edited(saved, lambda raw: raw["model"].update({"wte.weight": raw["model"]["wte.weight"].double()}))
    with pytest.raises(GptlabError, match="wrong dtype: wte.weight"):
        load_model(saved)


def test_allocation_failure_is_one_line(saved: Path, monkeypatch) -> None:
    real = torch.nn.Linear.reset_parameters

    def fail(self):
        if self.weight.device.type != "meta":
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1649267441664 bytes")
        real(self)

    monkeypatch.setattr(torch.nn.Linear, "reset_parameters", fail)
    with pytest.raises(GptlabError, match=r"cannot allocate the model of .*GiB of weights.*can't allocate memory"):
        load_model(saved)


# ---- fields of the wrong type or range ---------------------------------------------------------------
@pytest.mark.parametrize(
    "edit, field",
    [
        (lambda raw: raw.update(step="abc"), "step"),
        (lambda raw: raw.update(step=torch.tensor([1, 2])), "step"),
        (lambda raw: raw.update(epoch=-1), "epoch"),
        (lambda raw: raw["extra"].update(tokens_seen="many"), "extra.tokens_seen"),
        (lambda raw: raw["extra"].update(tokens_seen=torch.ones(3)), "extra.tokens_seen"),
        (lambda raw: raw["extra"].update(epoch_batches_done=-4), "extra.epoch_batches_done"),
        (lambda raw: raw["rng"].update(torch="seed"), "rng.torch"),
        (lambda raw: raw["rng"]["python"].update(state=[1, 2, 3]), "rng.python.state"),
        (lambda raw: raw["rng"]["numpy"].update(pos=10_000), "rng.numpy.pos"),
        (lambda raw: raw["rng"]["numpy"].update(keys=torch.zeros(5, dtype=torch.int64)), "rng.numpy.keys"),
        (lambda raw: raw.update(optimizer="adam"), "optimizer"),
        (lambda raw: raw["optimizer"]["optimizers"]["adamw"].update(state=[1]), "optimizer.optimizers.adamw"),
        (
            lambda raw: raw["optimizer"]["optimizers"]["adamw"]["state"].update({0: "x"}),
            "optimizer.optimizers.adamw.state[0]",
        ),
        (lambda raw: raw.update(model={"wte.weight": 3}), "model"),
    ],
)
def test_a_field_of_the_wrong_type_or_range_is_named(saved: Path, edit, field: str, capsys) -> None:
    edited(saved, edit)
    with pytest.raises(GptlabError, match=rf"field '{__import__('re').escape(field)}' .*the checkpoint is damaged"):
        load_checkpoint(saved)
    assert main(["generate", "--model_path", str(saved), "--prompt", "hi", "--length", "2", "--device", "cpu"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and f"'{field}'" in err


def test_random_bytes_are_not_a_torch_file(tmp_path: Path) -> None:
    path = tmp_path / "noise.pth"
    path.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(GptlabError, match=r"it is not a torch file \(UnpicklingError\); pass a \.pth"):
        load_checkpoint(path)


# ---- restoring states that pass the checks but not torch's ----------------------------------------
TINY_RUN = ROOT / "toy_data" / "tiny_sp_train.txt"


def train_args(tmp: Path, *extra: str) -> list[str]:
    return [
        "train", "--tokenizer", str(ROOT / "toy_data" / "tiny_sp"), "--train_data", str(tmp / "train.txt"),
        "--embed_dim", "16", "--num_layers", "1", "--n_heads", "2", "--seq_len", "8", "--batch_size", "2",
        "--max_steps", "4", "--eval_interval", "1000", "--device", "cpu", "--experiment_name", "exp",
        "--checkpoint_dir", str(tmp / "ckpt"), "--log_dir", str(tmp / "runs"), "--no_progress", *extra,
    ]  # fmt: skip


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda raw: raw["rng"].update(torch=torch.zeros(10, dtype=torch.uint8)), "field 'rng' cannot be restored"),
        (
            lambda raw: raw["optimizer"]["optimizers"]["adamw"]["state"][0].update(exp_avg=torch.zeros(3, 3)),
            "optimizer state has exp_avg of shape \\(3, 3\\)",
        ),
        (
            lambda raw: raw["optimizer"]["optimizers"]["adamw"]["param_groups"][0].update(params=[0]),
            "optimizer state does not fit this model",
        ),
    ],
)
def test_resume_from_a_state_torch_refuses_is_one_line(tmp_path: Path, edit, message: str, capsys) -> None:
    (tmp_path / "train.txt").write_text(TINY_RUN.read_text(encoding="utf-8")[:4_000], encoding="utf-8")
    assert main(train_args(tmp_path, "--max_steps", "2")) == 0
    checkpoint = next((tmp_path / "ckpt").glob("exp_*.pth"))
    edited(checkpoint, edit)
    capsys.readouterr()
    assert main(train_args(tmp_path, "--resume", str(checkpoint))) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
    assert __import__("re").search(message, err), err


# ---- durability ------------------------------------------------------------------------------------
def test_atomic_write_syncs_the_file_before_the_rename_and_the_folder_after(tmp_path: Path, monkeypatch) -> None:
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst) -> None:
        events.append(("replace", str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(files.os, "fsync", fsync)
    monkeypatch.setattr(files.os, "replace", replace)
    target = tmp_path / "out.json"
    files.write_atomic(target, b"{}")
    assert [kind for kind, _ in events] == ["fsync", "replace", "fsync"]
    assert events[0][1].startswith(str(tmp_path / ".out.json.")) and events[2][1] == str(tmp_path)
    assert target.read_bytes() == b"{}" and os.listdir(tmp_path) == ["out.json"]

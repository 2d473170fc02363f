"""Exact resume: a run SIGKILLed at an arbitrary moment and resumed with `--resume auto` logs the
same per-step losses and ends with the same weights as a run never stopped; step checkpoints,
the latest pointer and keep_last."""

from __future__ import annotations

import json
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
from gptlab.training.run_files import find_latest, prune_step_checkpoints, read_step_log, write_latest

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "toy_data" / "tiny_sp"
TRAIN_TEXT = ROOT / "toy_data" / "tiny_sp_train.txt"
STEPS = 300


# fp32, named: these runs are replayed in processes of their own (see conftest.cpu_bf16_measured_slow).
def train_args(tmp: Path, run: str, *extra: str) -> list[str]:
    return [
        "train", "--tokenizer", str(TOKENIZER), "--train_data", str(tmp / "train.txt"),
        "--embed_dim", "32", "--num_layers", "2", "--n_heads", "2", "--seq_len", "16", "--batch_size", "4",
        "--dropout", "0.1", "--max_steps", str(STEPS), "--eval_interval", "1000", "--device", "cpu",
        "--save_every_steps", "10", "--keep_last", "2", "--experiment_name", "exp",
        "--checkpoint_dir", str(tmp / run), "--log_dir", str(tmp / run / "runs"),
        "--no_progress", "--dtype", "fp32", *extra,
    ]  # fmt: skip


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    (tmp_path / "train.txt").write_text(TRAIN_TEXT.read_text(encoding="utf-8")[:12_000], encoding="utf-8")
    return tmp_path


def test_sigkilled_run_resumed_with_auto_matches_an_uninterrupted_one(workdir: Path) -> None:
    assert main(train_args(workdir, "whole")) == 0

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    killed = subprocess.Popen(
        [sys.executable, "-m", "gptlab", *train_args(workdir, "parts")],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    pointer = workdir / "parts" / "exp_latest.json"
    deadline = time.monotonic() + 120
    while not (pointer.exists() and json.loads(pointer.read_text())["step"] >= 30):
        assert killed.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.01)
    killed.send_signal(signal.SIGKILL)
    assert killed.wait() == -signal.SIGKILL
    stopped_at = read_step_log(workdir / "parts" / "runs" / "exp" / "metrics.jsonl")[-1]["step"]
    assert stopped_at < STEPS

    assert main(train_args(workdir, "parts", "--resume", "auto")) == 0

    whole = read_step_log(workdir / "whole" / "runs" / "exp" / "metrics.jsonl")
    parts = read_step_log(workdir / "parts" / "runs" / "exp" / "metrics.jsonl")
    assert [e["step"] for e in parts] == list(range(1, STEPS + 1))
    assert [e["loss"] for e in parts] == [e["loss"] for e in whole]  # bitwise
    a = load_checkpoint(find_latest(workdir / "whole", "exp"))
    b = load_checkpoint(find_latest(workdir / "parts", "exp"))
    assert (a.step, b.step) == (STEPS, STEPS)
    for name, tensor in a.model_state.items():
        assert torch.equal(b.model_state[name], tensor), name
    # keep_last 2: only the two newest step checkpoints remain, beside the final one.
    names = sorted(p.name for p in (workdir / "parts").glob("exp_s*.pth"))
    assert names == [f"exp_s{STEPS - 10}.pth", f"exp_s{STEPS}.pth"]
    assert find_latest(workdir / "parts", "exp").name == "exp_e3.pth"  # the final checkpoint, 3rd epoch


def test_shifted_windows_change_later_epochs_only_and_resume_exactly(workdir: Path) -> None:
    # A constant learning rate, so that stopping early (--max_steps 130) leaves the schedule unchanged.
    flags = ("--warmup_steps", "0", "--min_lr_ratio", "1", "--dropout", "0.0")
    assert main(train_args(workdir, "plain", *flags, "--max_steps", "160")) == 0
    shifted = (*flags, "--shift_windows")
    assert main(train_args(workdir, "whole", *shifted, "--max_steps", "160")) == 0
    assert main(train_args(workdir, "parts", *shifted, "--max_steps", "130")) == 0
    assert main(train_args(workdir, "parts", *shifted, "--max_steps", "160", "--resume", "auto")) == 0

    plain, whole, parts = (
        read_step_log(workdir / run / "runs" / "exp" / "metrics.jsonl") for run in ("plain", "whole", "parts")
    )
    assert [e["loss"] for e in parts] == [e["loss"] for e in whole]  # bitwise, across the resume
    assert whole[129]["epoch"] == 2  # the resume happened inside a shifted epoch
    first_epoch = [i for i, e in enumerate(whole) if e["epoch"] == 1]
    assert [whole[i]["loss"] for i in first_epoch] == [plain[i]["loss"] for i in first_epoch]
    assert whole[first_epoch[-1] + 1]["loss"] != plain[first_epoch[-1] + 1]["loss"]  # other windows


def test_a_bf16_run_with_muon_resumes_exactly(workdir: Path) -> None:
    # A constant learning rate, so that stopping early (--max_steps 30) leaves the schedule unchanged.
    flags = ("--warmup_steps", "0", "--min_lr_ratio", "1", "--dtype", "bf16", "--optimizer", "muon")
    assert main(train_args(workdir, "whole", *flags, "--max_steps", "60")) == 0
    assert main(train_args(workdir, "parts", *flags, "--max_steps", "30")) == 0
    assert main(train_args(workdir, "parts", *flags, "--max_steps", "60", "--resume", "auto")) == 0
    whole, parts = (read_step_log(workdir / run / "runs" / "exp" / "metrics.jsonl") for run in ("whole", "parts"))
    assert len(parts) == 60 and [e["loss"] for e in parts] == [e["loss"] for e in whole]  # bitwise
    a, b = (load_checkpoint(find_latest(workdir / run, "exp")) for run in ("whole", "parts"))
    assert all(torch.equal(b.model_state[name], tensor) for name, tensor in a.model_state.items())


def test_a_dtype_auto_run_resumes_in_the_precision_it_trained_in(workdir: Path, monkeypatch, capsys) -> None:
    """A CPU near the line (bf16 measured 1.0-1.2x float32's speed) may decide the other way when
    a resumed run measures again: the checkpoint's decision is kept, for autocast and for Muon."""
    from gptlab import device
    from gptlab.training import precision

    def bf16_measures(speedup: float) -> None:
        for module in (device, precision):
            monkeypatch.setattr(module, "cpu_bf16_speedup", lambda: speedup)

    flags = ("--warmup_steps", "0", "--min_lr_ratio", "1", "--dtype", "auto", "--optimizer", "muon")
    bf16_measures(1.1)
    assert main(train_args(workdir, "whole", *flags, "--max_steps", "60")) == 0
    assert main(train_args(workdir, "parts", *flags, "--max_steps", "30")) == 0
    bf16_measures(0.9)  # measured again here, fp32 would be chosen
    capsys.readouterr()
    assert main(train_args(workdir, "parts", *flags, "--max_steps", "60", "--resume", "auto")) == 0
    assert "--dtype auto: bf16, as the run being resumed trained" in capsys.readouterr().out
    whole, parts = (read_step_log(workdir / run / "runs" / "exp" / "metrics.jsonl") for run in ("whole", "parts"))
    assert len(parts) == 60 and [e["loss"] for e in parts] == [e["loss"] for e in whole]  # bitwise
    assert load_checkpoint(find_latest(workdir / "parts", "exp")).extra["bf16_fast"] is True


def test_resume_auto_without_a_checkpoint_starts_fresh(workdir: Path, capsys) -> None:
    args = train_args(workdir, "fresh", "--resume", "auto", "--max_steps", "3", "--save_every_steps", "2")
    assert main(args) == 0
    assert "no exp_latest.json" in capsys.readouterr().out
    assert load_checkpoint(find_latest(workdir / "fresh", "exp")).step == 3


def test_prune_never_deletes_the_checkpoint_the_pointer_names(tmp_path: Path) -> None:
    for step in (2, 4, 6, 8):
        (tmp_path / f"exp_s{step}.pth").write_bytes(b"x")
    (tmp_path / "exp_e1.pth").write_bytes(b"x")
    (tmp_path / "other_s2.pth").write_bytes(b"x")
    write_latest(tmp_path, "exp", tmp_path / "exp_s4.pth", step=4, epoch=1)
    deleted = prune_step_checkpoints(tmp_path, "exp", keep_last=1)
    assert sorted(p.name for p in deleted) == ["exp_s2.pth", "exp_s6.pth"]
    assert sorted(p.name for p in tmp_path.glob("*.pth")) == ["exp_e1.pth", "exp_s4.pth", "exp_s8.pth", "other_s2.pth"]


def test_pointer_to_a_missing_checkpoint_is_a_clear_error(tmp_path: Path, capsys) -> None:
    write_latest(tmp_path, "exp", tmp_path / "exp_s4.pth", step=4, epoch=1)
    from gptlab.errors import GptlabError

    with pytest.raises(GptlabError, match="no longer exists"):
        find_latest(tmp_path, "exp")

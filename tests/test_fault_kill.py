"""Fault campaign: a training run SIGKILLed again and again at random moments (some while a
checkpoint is being written) and resumed with `--resume auto` each time ends with the same loss
curve and weights, bitwise, as a run never stopped, and no temporary file is left behind.

The kill moments come from a seeded generator, so a failure reproduces with the same seed. The
killed runs write their checkpoints slowly (half the bytes, a pause, the rest), so that a kill
aimed at a checkpoint write lands inside one whatever the machine's speed."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from gptlab.cli import main
from gptlab.training import load_checkpoint
from gptlab.training.run_files import find_latest, read_step_log

ROOT = Path(__file__).resolve().parents[1]
SEED = 17
WAIT_S = 120  # the most any one wait may take (imports on a busy machine included)
SLOW_SAVE_CHILD = """
import io, os, sys, time, torch
real_save = torch.save
def slow_save(obj, f, *args, **kwargs):
    if not isinstance(f, (str, os.PathLike)):
        return real_save(obj, f, *args, **kwargs)
    buffer = io.BytesIO()
    real_save(obj, buffer, *args, **kwargs)
    data = buffer.getvalue()
    with open(f, "wb") as out:
        out.write(data[: len(data) // 2])
        out.flush()
        time.sleep(0.1)
        out.write(data[len(data) // 2 :])
torch.save = slow_save
from gptlab.cli import main
sys.exit(main(sys.argv[1:]))
"""


# fp32, named: these runs are replayed in processes of their own (see conftest.cpu_bf16_measured_slow).
def train_args(tmp: Path, run: str, steps: int, *extra: str) -> list[str]:
    return [
        "train", "--tokenizer", str(ROOT / "toy_data" / "tiny_sp"), "--train_data", str(tmp / "train.txt"),
        "--embed_dim", "16", "--num_layers", "1", "--n_heads", "2", "--seq_len", "16", "--batch_size", "4",
        "--dropout", "0.1", "--max_steps", str(steps), "--eval_interval", "1000", "--device", "cpu",
        "--save_every_steps", "3", "--keep_last", "2", "--experiment_name", "exp",
        "--checkpoint_dir", str(tmp / run), "--log_dir", str(tmp / run / "runs"),
        "--no_progress", "--dtype", "fp32", *extra,
    ]  # fmt: skip


def logged_steps(run_dir: Path) -> int:
    log = run_dir / "runs" / "exp" / "metrics.jsonl"
    return len(read_step_log(log)) if log.is_file() else 0


def temporaries(run_dir: Path) -> list[Path]:
    return [p for p in run_dir.rglob("*.tmp")]


def wait_for(condition, process: subprocess.Popen) -> bool:
    """Poll `condition` until it holds (True) or the process ends (False); bounded by WAIT_S."""
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if process.poll() is not None:
            return False
        assert time.monotonic() < deadline, "the run made no progress in time"
        time.sleep(0.0005)
    return True


def kill_campaign(tmp: Path, steps: int, kills: int) -> None:
    (tmp / "train.txt").write_text((ROOT / "toy_data" / "tiny_sp_train.txt").read_text(encoding="utf-8")[:8_000])
    assert main(train_args(tmp, "whole", steps)) == 0  # also prepares the token cache both runs use

    rng = random.Random(SEED)
    parts = tmp / "parts"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT / "src")}
    killed, mid_write = 0, 0
    for attempt in range(kills):
        before = logged_steps(parts)
        process = subprocess.Popen(
            [sys.executable, "-c", SLOW_SAVE_CHILD, *train_args(tmp, "parts", steps, "--resume", "auto")],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            # Once it trains again (its log passes where the last run was killed), wait a random
            # while, then kill it at once or (every other time) in its next checkpoint write.
            training = wait_for(lambda before=before: logged_steps(parts) > min(before, steps - 1), process)
            if training:
                time.sleep(rng.uniform(0.0, 0.4))
            if training and attempt % 2 == 0:
                wait_for(lambda: any(parts.glob(".exp_*.tmp")), process)
            process.send_signal(signal.SIGKILL)
            code = process.wait(timeout=WAIT_S)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        if code != -signal.SIGKILL:  # it finished before the kill: nothing left to interrupt
            assert code == 0
            break
        killed += 1
        mid_write += bool(temporaries(parts))

    pointer = parts / "exp_latest.json"
    if not pointer.is_file() or json.loads(pointer.read_text())["step"] < steps:
        assert main(train_args(tmp, "parts", steps, "--resume", "auto")) == 0

    assert killed >= 1 and mid_write >= 1, (killed, mid_write)  # the campaign hit a checkpoint write
    whole = read_step_log(tmp / "whole" / "runs" / "exp" / "metrics.jsonl")
    resumed = read_step_log(parts / "runs" / "exp" / "metrics.jsonl")
    assert [e["step"] for e in resumed] == list(range(1, steps + 1))
    assert [e["loss"] for e in resumed] == [e["loss"] for e in whole]  # bitwise
    a, b = load_checkpoint(find_latest(tmp / "whole", "exp")), load_checkpoint(find_latest(parts, "exp"))
    assert (a.step, b.step) == (steps, steps)
    for name, tensor in a.model_state.items():
        assert torch.equal(b.model_state[name], tensor), name
    assert temporaries(parts) == [] and temporaries(tmp / "whole") == []


def test_run_killed_three_times_at_random_resumes_exactly(tmp_path: Path, one_thread) -> None:
    kill_campaign(tmp_path, steps=60, kills=3)


@pytest.mark.slow
def test_run_killed_ten_times_at_random_resumes_exactly(tmp_path: Path, one_thread) -> None:
    kill_campaign(tmp_path, steps=240, kills=10)


def test_stale_temporaries_of_a_killed_run_are_removed_and_others_kept(tmp_path: Path) -> None:
    from gptlab.training.run_files import remove_stale_temporaries

    ckpt, logs = tmp_path / "ckpt", tmp_path / "ckpt" / "runs" / "exp"
    logs.mkdir(parents=True)
    stale = [
        ckpt / ".exp_s12.pth.k3j_x9a1.tmp",
        ckpt / ".exp_latest.json.a1b2c3d4.tmp",
        logs / ".metrics.jsonl.zz99.tmp",
    ]
    kept = [ckpt / ".other_s12.pth.k3j_x9a1.tmp", ckpt / "exp_s12.pth", ckpt / ".exp_notes.tmp"]
    for path in stale + kept:
        path.write_bytes(b"x")
    assert sorted(remove_stale_temporaries(ckpt, logs, "exp")) == sorted(stale)
    assert all(p.exists() for p in kept) and not any(p.exists() for p in stale)
